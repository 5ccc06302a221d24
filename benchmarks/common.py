"""Shared helpers for the benchmark scripts (not tests): timing, FLOPs, memory, workers, output.

Every benchmark runs each measured configuration in a fresh worker process (`--worker SPEC`), so
peak memory is per configuration and our model and the official one never share a process. The
parent collects the workers' JSON lines, compares their saved outputs and prints one JSON object
(first line of stdout) followed by a readable table.

Memory on CPU: peak RSS is read from `/proc/self/status` `VmHWM` after resetting it by writing "5" to
`/proc/self/clear_refs` (exact, kernel-tracked); where that reset is refused, a thread samples
`VmRSS` every 2 ms instead. The JSON names which method gave the number.

The official VideoCrafter code (`--official DIR`, a checkout of AILab-CVC/VideoCrafter) is imported
with small stand-in modules written to a temporary directory at run time: `pytorch_lightning`
(`LightningModule` = `nn.Module` with a `device` property) and, where not installed, `cv2` and
`transformers` (imported by the official files but unused on the paths we run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# VC_BENCH_ROOT=<another checkout> measures that checkout's vc_model with these scripts (before/after
# comparisons against an older commit, e.g. from `git worktree add /tmp/before <commit>`).
if os.environ.get("VC_BENCH_ROOT"):
    sys.path.insert(0, str(Path(os.environ["VC_BENCH_ROOT"]).resolve()))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CACHE = Path(os.environ.get("VC_BENCH_CACHE", Path.home() / ".cache" / "vc_bench"))


# ----------------------------------------------------------------------------- machine


def machine_info(device: str = "cpu") -> dict:
    """CPU model, threads used, torch version (and GPU name on CUDA)."""
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": model, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "vc_model_root": os.environ.get("VC_BENCH_ROOT") or str(REPO)}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


class PeakRSS:
    """Peak resident set size over a `with` block, in bytes (`.peak`), and the method used."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
            self._thread = None
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
            self._max = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = _status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes())
        return False


class CudaPeak:
    """Peak `torch.cuda.max_memory_allocated` over a `with` block (bytes above the start)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        self.method = "torch.cuda.max_memory_allocated"
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()
        return False


def peak_meter(device: str):
    return CudaPeak() if device.startswith("cuda") else PeakRSS()


def baseline_bytes(device: str) -> int:
    """What is in use before any weight exists: RSS on CPU, allocated memory on CUDA."""
    return torch.cuda.memory_allocated() if device.startswith("cuda") else rss_bytes()


BASELINE_METHOD = ("RSS after the imports and one run of the tiny random model in the same dtype "
                   "(so thread pools and library state exist), before any benchmark weight is read")


def warm_libraries(device: str, dtype: torch.dtype) -> None:
    """Run the tiny model (a few MB) once: what the libraries allocate on first use then belongs to
    the baseline, not to the benchmarked model's peak."""
    import gc

    import vc_model

    cfg = vc_model.tiny_config()
    bundle = vc_model.build(vc_model.random_state_dict(cfg), config=cfg, dtype=dtype, device=device)
    with torch.inference_mode():
        latent = torch.randn(1, 4, 2, 8, 8, device=device, dtype=dtype)
        bundle.unet(latent, torch.tensor([1], device=device), torch.randn(1, 77, 64, device=device, dtype=dtype))
        bundle.vae.decode(latent)
    del bundle, latent
    gc.collect()


def tensor_bytes(module_or_tensors) -> int:
    if isinstance(module_or_tensors, torch.nn.Module):
        tensors = list(module_or_tensors.parameters()) + list(module_or_tensors.buffers())
    elif isinstance(module_or_tensors, dict):
        tensors = list(module_or_tensors.values())
    else:
        tensors = list(module_or_tensors)
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- timing, FLOPs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_runs(fn, runs: int, warmup: int, device: str = "cpu") -> dict:
    """Call fn() warmup times, then runs times; seconds: min, median and every run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"min_s": min(times), "median_s": statistics.median(times), "runs_s": [round(t, 4) for t in times],
            "cpu_s": [round(t, 3) for t in cpu], "loadavg_1min": os.getloadavg()[0]}


def interleave(fns: dict, rounds: int, device: str = "cpu") -> dict:
    """Call each fn once (warm-up), then all of them in turn for `rounds` rounds; seconds per fn.

    Used to compare implementations in one process when other work shares the machine: a busy
    moment slows all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {"ab": {name: {"min_s": min(v), "median_s": statistics.median(v), "runs_s": [round(r, 3) for r in v]}
                   for name, v in times.items()}, "loadavg_1min": os.getloadavg()[0]}


def interleaved_table(ab: dict, rounds: int) -> str:
    ref = ab["ab"]["official fp32"]["min_s"]
    rows = [{"run": name, **v, "ratio": v["min_s"] / ref} for name, v in ab["ab"].items()]
    return (f"Interleaved in one process, {rounds} rounds (load avg {ab['loadavg_1min']:.1f}):\n"
            + table(rows, [("run", "run"), ("min_s", "min s"), ("median_s", "median s"),
                           ("ratio", "min / official min")]))


def count_flops(fn) -> int:
    """FLOPs of fn() by `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2).

    Attention is counted through the math backend (CPU fused kernels are not registered with the
    counter), so the number is the same whichever kernel the timed runs use."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- the random checkpoint


class Subset(Mapping):
    """A read-only view of some keys of a (lazy) state dict; values are read on access."""

    def __init__(self, base: Mapping, keys):
        self.base, self._keys = base, list(keys)
        self._set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self.base[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def release(self, key):
        """Forward `vc_model.build`'s page release to the underlying lazy mapping."""
        release = getattr(self.base, "release", None)
        if release is not None:
            release(key)


def random_checkpoint(cache: str | os.PathLike = DEFAULT_CACHE, seed: int = 0) -> dict[str, Path]:
    """A full-size VideoCrafter2 checkpoint with random weights (`vc_model.random_state_dict`),
    written once as `.ckpt` (Lightning-style `{"state_dict": ...}`, torch zip format) and as
    `.safetensors` (float32, via `vc_model.convert`), in `cache` (outside the repository)."""
    import vc_model
    from vc_model.config import VC2_T2V_512
    from vc_model.convert import convert_checkpoint

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / f"vc2_random_seed{seed}.ckpt"
    safetensors = cache / f"vc2_random_seed{seed}.safetensors"
    if not ckpt.is_file():
        print(f"writing {ckpt} (one time, about 7 GB) ...", file=sys.stderr, flush=True)
        state = vc_model.random_state_dict(VC2_T2V_512, seed=seed)
        tmp = ckpt.with_suffix(".ckpt.tmp")
        torch.save({"state_dict": state}, tmp)
        del state
        tmp.rename(ckpt)
    if not safetensors.is_file():
        print(f"writing {safetensors} ...", file=sys.stderr, flush=True)
        convert_checkpoint(ckpt, safetensors, dtype="fp32", verify=False)
    return {"ckpt": ckpt, "safetensors": safetensors}


def component_weights(path: str | os.PathLike, prefix: str) -> Mapping[str, torch.Tensor]:
    """The tensors under `prefix` of a checkpoint file, read lazily (keys keep the prefix)."""
    from vc_model.checkpoint import lazy_state_dict

    state = lazy_state_dict(path)
    return Subset(state, [k for k in state if k.startswith(prefix)])


# ----------------------------------------------------------------------------- comparing outputs


def compare(actual: torch.Tensor, reference: torch.Tensor) -> dict:
    """max |a - r|, that relative to max |r|, and the relative RMS error ||a - r|| / ||r||."""
    a, r = actual.double(), reference.double()
    diff = (a - r).abs().max().item()
    return {"max_abs": diff, "max_abs_rel": diff / max(r.abs().max().item(), 1e-30),
            "rel_rms": ((a - r).norm() / r.norm().clamp_min(1e-30)).item()}


# ----------------------------------------------------------------------------- the official code


def comparisons(results: list[dict], label) -> list[dict]:
    """Output differences and time ratios of each of our runs against the official fp32 run and
    against our plain fp32 run (`label(r) == "ours fp32"`), per latent size."""
    out, groups = [], {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["frames"], r["height"], r["width"]), []).append(r)
    for size, rows in groups.items():
        ref = next((r for r in rows if r["impl"] == "official"), None)
        ours = [r for r in rows if r["impl"] == "ours" and r["dtype"] == "fp32"]
        ours32 = next((r for r in ours if label(r) == "ours fp32"), ours[0] if ours else None)
        for r in rows:
            if r["impl"] == "official":
                continue
            for base in (ref, ours32):
                if base is None or base is r:
                    continue
                diff = compare(torch.load(r["save"]), torch.load(base["save"]))
                out.append({"size": "x".join(map(str, size)), "run": label(r), "against": label(base),
                            "time_ratio": r["min_s"] / base["min_s"], **diff})
    return out


COMPARISON_COLUMNS = [("size", "size"), ("run", "run"), ("against", "against"), ("time_ratio", "time ratio"),
                      ("max_abs", "max|diff|"), ("max_abs_rel", "max|diff|/max|ref|"), ("rel_rms", "rel RMS")]


def error_lines(results: list[dict], label) -> str:
    """One 'ERROR in <run>: ...' paragraph per failed worker run."""
    return "".join(f"\n\nERROR in {label(r)}: {r['error']}" for r in results if "error" in r)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def import_official(official: str | os.PathLike) -> None:
    """Put the official checkout and run-time stand-ins for its training-only imports on sys.path."""
    official = Path(official).resolve()
    if not (official / "lvdm" / "modules" / "networks" / "openaimodel3d.py").is_file():
        raise SystemExit(f"--official {official}: not a VideoCrafter checkout (no lvdm/modules/networks/openaimodel3d.py)")
    stubs = Path(tempfile.mkdtemp(prefix="vc_bench_stubs_"))
    _write(stubs / "pytorch_lightning" / "__init__.py", (
        "import torch\n\n"
        "class LightningModule(torch.nn.Module):\n"
        "    @property\n"
        "    def device(self):\n"
        "        p = next(self.parameters(), None)\n"
        "        return p.device if p is not None else torch.device('cpu')\n"
    ))
    for name, text in (("cv2", ""), ("transformers", "T5Tokenizer = T5EncoderModel = CLIPTokenizer = CLIPTextModel = None\n")):
        try:
            __import__(name)
        except ImportError:
            _write(stubs / f"{name}.py", text)
    sys.path[:0] = [str(official), str(stubs)]


# ----------------------------------------------------------------------------- workers


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own, = physical cores)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--official", default=None, help="official VideoCrafter checkout, to measure it side by side")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE),
                        help="folder for the random full-size checkpoint (outside the repository)")
    parser.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run_worker(script: str, spec: dict, timeout: float = 1800) -> dict:
    """Run `script --worker SPEC` in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {**spec, "error": f"worker exited with {proc.returncode}: {tail.strip()}"}
    return json.loads(lines[-1])


def worker_main(fn) -> None:
    """Entry for `--worker SPEC`: run fn(spec), print its JSON result as the last line."""
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    setup_threads(spec.get("threads"))
    torch.manual_seed(0)
    result = fn(spec)
    print(json.dumps({**spec, **result}), flush=True)


def is_worker() -> bool:
    return "--worker" in sys.argv


def run(main, worker) -> None:
    """A benchmark script's entry: `worker(spec)` in a `--worker` subprocess, else `main()`."""
    if is_worker():
        worker_main(worker)
    else:
        main()


# ----------------------------------------------------------------------------- output


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return text + unit
    return f"{value}{unit}"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table; columns are (key, header)."""
    cells = [[header for _, header in columns]] + [[row.get(key, "") if isinstance(row.get(key), str)
                                                    else fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(str(line[i])) for line in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(str(c).rjust(w) if n else str(c).ljust(w) for c, w in zip(line, widths)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def emit(result: dict, text: str, json_out: str | None = None) -> None:
    """Print the JSON object (one line) and then the table."""
    line = json.dumps(result)
    print(line)
    print()
    print(text, flush=True)
    if json_out:
        Path(json_out).write_text(line + "\n")


GiB = 1024 ** 3
MiB = 1024 ** 2
