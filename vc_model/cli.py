"""`python -m vc_model`: generate, convert, demo and info, without ComfyUI.

Mistakes a user can make (a missing file, a wrong extension, sizes the model cannot take) end
with one sentence on stderr and exit status 2; running out of GPU memory ends with advice and
exit status 3; Ctrl-C ends with status 130 and leaves no partial output file.
Set VC_MODEL_DEBUG=1 to see the full traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoint import PICKLE_EXTENSIONS, SAFETENSORS_DTYPES, SAFETENSORS_EXTENSIONS
from .freenoise import DEFAULT_STRIDE

CHECKPOINT_EXTENSIONS = PICKLE_EXTENSIONS + SAFETENSORS_EXTENSIONS
MAX_FRAMES = 256
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """A mistake in the command line, reported as one sentence."""


# --------------------------------------------------------------------------------------------
# progress


class ProgressBar:
    """`sampling  12/50 [######......]  24%  0:05 elapsed, ETA 0:16` on stderr.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a line is printed about every
    10% so the output stays short. Usable as a `sample_ddim` callback(i, total, *_).
    """

    def __init__(self, label: str = "sampling", stream=None, width: int = 24):
        self.label, self.width = label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.first = None  # (time, steps done) of the first report: the ETA counts from there
        self.last_decile = -1

    def __call__(self, i: int, total: int, *_) -> None:
        done, now = i + 1, time.monotonic()
        elapsed = now - self.start
        if self.first is None:
            self.first = (now, done)
        # the first step also pays for warm-up (and whatever ran before it), so it is left out of the rate
        first_time, first_done = self.first
        if done > first_done:
            eta = _clock((now - first_time) / (done - first_done) * (total - done))
        else:
            eta = _clock(elapsed / done * (total - done)) if done == total else "?"
        filled = self.width * done // total
        line = (f"{self.label} {done:>{len(str(total))}}/{total} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * done // total:>3}%  {_clock(elapsed)} elapsed, ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
        elif (decile := 10 * done // total) != self.last_decile:
            self.last_decile = decile
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# checks that run before anything heavy


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    if not p.name.lower().endswith(CHECKPOINT_EXTENSIONS):
        raise UsageError(f"'{p.name}' is not a checkpoint file: expected a .ckpt or .safetensors file.")
    if not p.is_file():
        raise UsageError(f"No checkpoint file at '{p}': check the path.")
    return p


def _mp4_path(path: str) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".mp4":
        raise UsageError(f"The output '{p.name}' must end in .mp4.")
    if p.is_dir():
        raise UsageError(f"The output '{p}' is a folder: give a file name ending in .mp4.")
    return p


def _check_range(name: str, value, low, high, hint: str = "") -> None:
    if not low <= value <= high:
        raise UsageError(f"--{name} must be between {low} and {high}, got {value}{hint}.")


def _check_sampling(args) -> None:
    if args.steps is not None:
        _check_range("steps", args.steps, 1, 1000)
    _check_range("cfg", args.cfg, 0.0, 100.0)
    _check_range("eta", args.eta, 0.0, 1.0,
                 " (eta is the DDIM noise amount: 0 is deterministic, 1 the official default; it is not a duration)")
    _check_range("save-fps", args.save_fps, 1, 120)
    if args.fps is not None:
        _check_range("fps", args.fps, 1, 120)
    if args.frames is not None:
        _check_range("frames", args.frames, 1, MAX_FRAMES)
    _check_turbo_options(args)


def _check_turbo_options(args) -> None:
    """T2V-Turbo's options (generate --turbo); they mean nothing without it."""
    turbo = getattr(args, "turbo", None)
    given = [f"--{name.replace('_', '-')}" for name in ("guidance", "motion_guidance", "motion_percentage")
             if getattr(args, name, None) is not None]
    if turbo is None:
        if given:
            raise UsageError(f"{', '.join(given)} {'is a' if len(given) == 1 else 'are'} T2V-Turbo option"
                             f"{'' if len(given) == 1 else 's'}: add --turbo unet_lora.pt (or unet_mg.pt).")
        return
    if not Path(turbo).is_file():
        raise UsageError(f"No T2V-Turbo file at '{turbo}': check the path.")
    if args.steps is not None:
        _check_range("steps", args.steps, 1, 200, " (T2V-Turbo's timesteps come from a grid of 200; officially 4 to 16)")
    if args.guidance is not None:
        _check_range("guidance", args.guidance, 0.0, 100.0)
    if args.motion_percentage is not None:
        _check_range("motion-percentage", args.motion_percentage, 0.0, 1.0)
    if getattr(args, "negative", None) is not None:
        raise UsageError("T2V-Turbo samples without classifier-free guidance, so it takes no --negative prompt.")
    if getattr(args, "travel", None):
        raise UsageError("--travel runs with the DDIM sampler; T2V-Turbo's sampler takes one prompt per video "
                         "(--window works with --turbo).")


def resolve_video_options(args, config) -> tuple[int, int, int, int]:
    """(height, width, frames, fps): the command line's values, or the model's native ones,
    with height and width checked against what the model can take."""
    from .pipeline import pixel_multiple

    pick = lambda value, default: default if value is None else value  # noqa: E731
    height, width = pick(args.height, config.height), pick(args.width, config.width)
    multiple = pixel_multiple(config)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise UsageError(f"--{name} must be a positive multiple of {multiple}, got {value} (try {nearest}).")
    return height, width, pick(args.frames, config.frames), pick(args.fps, config.fps)


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda, else mps, else cpu."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"Unknown device '{name}': use auto, cpu, cuda, cuda:N or mps.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but this PyTorch sees no CUDA GPU.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on a GPU (half the memory), fp32 on the CPU (half precision is slow there)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPE_NAMES[name]


def load_image(path: str) -> torch.Tensor:
    """An image file -> [1,3,H,W] in [-1,1]. Greyscale becomes RGB; transparency is composited on white."""
    from PIL import Image, ImageOps

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"No image file at '{p}': check the path.")
    try:
        with Image.open(p) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            img = img.convert("RGB")
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            image = data.view(img.height, img.width, 3)
    except (OSError, ValueError) as error:
        raise UsageError(f"'{p.name}' cannot be read as an image ({error}).") from None
    return image.permute(2, 0, 1)[None].float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# the shared run: pipeline -> mp4


def render(bundle, args, prompt: str, image=None) -> dict:
    """Run the pipeline with a progress bar and write args.out; returns the mp4's info."""
    from .pipeline import generate, to_uint8_frames
    from .video import read_mp4_info, write_mp4

    height, width, frames, fps = resolve_video_options(args, bundle.config)
    if bundle.turbo is not None:
        options = turbo_options(bundle, args)
        _say(f"generating {frames} frames at {width}x{height}, T2V-Turbo {bundle.turbo}: {options['steps']} steps, "
             f"guidance {options['guidance']}, motion guidance {options['motion_guidance']}, fps {fps}, seed {args.seed}")
    else:
        from .sampling import ddim_timesteps

        requested = 50 if args.steps is None else args.steps
        steps = len(ddim_timesteps(requested, bundle.schedule.num_timesteps))
        if steps != requested:
            _say(f"note: the official DDIM spacing runs {steps} steps for --steps {requested}")
        _say(f"generating {frames} frames at {width}x{height}, {steps} DDIM steps, cfg {args.cfg}, "
             f"eta {args.eta}, fps {fps}, seed {args.seed}")
        options = {"steps": requested, "cfg": args.cfg, "eta": args.eta,
                   "negative_prompt": getattr(args, "negative", None)}
    if args.window is not None:
        _say(f"FreeNoise: temporal windows of {args.window} frames every {args.stride}, rescheduled noise"
             + ("" if frames > args.window else f" (no effect on {frames} frames: the window holds them all)"))
    if args.travel:
        _say(f"prompt travel through {1 + len(args.travel)} prompts")
    video = generate(
        bundle, image=image, height=height, width=width, frames=frames, fps=fps,
        seed=args.seed, callback=ProgressBar("sampling"), **options, **long_video_arguments(args, prompt),
    )
    _say("decoded; writing the video")
    out = write_mp4(args.out, to_uint8_frames(video)[0], fps=args.save_fps)
    return read_mp4_info(out)


# --- long videos (FreeNoise) ---


def _check_long_video(args) -> None:
    if args.window is not None:
        _check_range("window", args.window, 1, MAX_FRAMES, " (16, what the models were trained on, is the official value)")
        _check_range("stride", args.stride, 1, args.window, " (at most the window, 4 officially)")
    elif args.stride != DEFAULT_STRIDE:
        raise UsageError("--stride needs --window (the windowed temporal attention it steps).")


def long_video_arguments(args, prompt: str) -> dict:
    """`generate` keywords for the prompt and the FreeNoise options of the command line."""
    arguments = {"temporal_window": args.window, "temporal_stride": args.stride}
    if args.travel:
        return {**arguments, "prompt_travel": [prompt, *args.travel]}
    return {**arguments, "prompt": prompt}


def _long_video_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int,
                   help="FreeNoise long videos: temporal attention in windows of this many frames (16 officially) "
                        "and rescheduled starting noise; use with --frames above 16 (default: off)")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                   help=f"frames between window starts (default {DEFAULT_STRIDE}, the official value)")
    p.add_argument("--travel", action="append", metavar="PROMPT", default=[],
                   help="prompt travel: the video moves on from the prompt to this one (repeat for more, in order)")


def turbo_options(bundle, args) -> dict:
    """generate()'s T2V-Turbo settings: the command line's, or the official ones of the release (steps 4 / 16,
    guidance 7.5, and for a v2 file with motion layers motion guidance 0.05 on the first half: predict.py)."""
    from .turbo import TURBO_DEFAULTS

    defaults = TURBO_DEFAULTS[bundle.turbo]
    motion = args.motion_guidance
    if motion is None and bundle.unet.motion_cond_proj is not None:
        motion = defaults.motion_guidance
    if motion is not None and bundle.unet.motion_cond_proj is None:
        raise UsageError("--motion-guidance needs a T2V-Turbo v2 file with motion guidance (unet_mg.pt); this one has "
                         "no motion layers.")
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return {"steps": pick(args.steps, defaults.steps), "guidance": pick(args.guidance, defaults.guidance),
            "motion_guidance": motion, "motion_percentage": pick(args.motion_percentage, defaults.motion_percentage)}


def _report(out: Path, info: dict, seconds: float) -> None:
    print(f"wrote {out} ({info['frames']} frames, {info['width']}x{info['height']}, {info['fps']:g} fps, "
          f"{info['codec']}) in {seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_generate(args) -> int:
    from . import apply_turbo, build
    from .checkpoint import lazy_state_dict
    from .detect import detect_config

    start = time.monotonic()
    ckpt = _checkpoint_path(args.ckpt)
    out = _mp4_path(args.out)
    _check_sampling(args)
    _check_long_video(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    image = load_image(args.image) if args.image else None

    _say(f"reading {ckpt}")
    state_dict = lazy_state_dict(ckpt)
    config = detect_config(state_dict)
    if config.unet is None or config.vae is None or config.text_encoder is None:
        raise UsageError(f"'{ckpt.name}' holds only part of a VideoCrafter model: generate needs the full "
                         "model.ckpt (U-Net, VAE and text encoder).")
    if config.is_i2v and image is None:
        raise UsageError(f"'{ckpt.name}' is {config.name}, an image-to-video model: pass --image.")
    if not config.is_i2v and image is not None:
        raise UsageError(f"'{ckpt.name}' is {config.name}, a text-to-video model: it takes no --image.")
    resolve_video_options(args, config)  # refuse bad sizes before building anything
    turbo = load_turbo_for(config, args.turbo) if args.turbo else None
    _say(f"model: {config.name}; building on {device} in {str(dtype).removeprefix('torch.')}")
    bundle = build(state_dict, config, dtype=dtype, device=device)
    del state_dict
    if turbo is not None:
        bundle = apply_turbo(bundle, turbo)
        del turbo
    info = render(bundle, args, args.prompt, image)
    _report(out, info, time.monotonic() - start)
    return 0


def load_turbo_for(config, path: str):
    """Read a T2V-Turbo file and check it against the model before anything is built."""
    from .turbo import load_turbo, prepare_turbo

    _say(f"reading T2V-Turbo {path}")
    turbo = load_turbo(path)
    prepare_turbo(config.unet, turbo, name=config.name)
    return turbo


def cmd_demo(args) -> int:
    from . import build, random_state_dict
    from .config import tiny_config

    start = time.monotonic()
    _mp4_path(args.out)
    _check_sampling(args)
    _check_long_video(args)
    config = tiny_config()
    resolve_video_options(args, config)
    _say("DEMO: this model has RANDOM weights, so the video is noise. It shows that the whole pipeline "
         "(text encoding, DDIM sampling, VAE decoding, mp4 writing) runs on this machine; use "
         "`python -m vc_model generate --ckpt <model.ckpt> \"a prompt\"` with a real checkpoint for real videos.")
    bundle = build(random_state_dict(config, seed=0), config, dtype=torch.float32, device="cpu")
    info = render(bundle, args, args.prompt)
    _report(Path(args.out), info, time.monotonic() - start)
    print("(random weights: the frames are noise, not a real video)")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    source = _checkpoint_path(args.ckpt)
    if args.out is not None and Path(args.out).suffix.lower() != ".safetensors":
        raise UsageError(f"The output '{Path(args.out).name}' must end in .safetensors.")
    _say(f"converting {source} to {args.dtype or 'fp16 (T2V-Turbo files: their stored precision)'}")
    bar = ProgressBar("writing")
    report = convert_checkpoint(source, args.out, dtype=args.dtype, force=args.force,
                                progress=lambda done, total: bar(done - 1, total))
    print(report.summary())
    return 0


def cmd_info(args) -> int:
    from . import build
    from .checkpoint import lazy_state_dict, with_unet_prefix

    ckpt = _checkpoint_path(args.ckpt)
    state_dict = with_unet_prefix(lazy_state_dict(ckpt))
    config = build(state_dict, device="meta").config  # every key, shape and dtype checked, without memory
    print(describe_checkpoint(ckpt, state_dict, config))
    return 0


def describe_checkpoint(path: Path, state_dict, config) -> str:
    """The text `info` prints: release, native settings, schedule and component sizes."""
    from .checkpoint import split_components
    from .convert import human_size

    shapes = _shapes_and_dtypes(path, state_dict)
    groups = split_components(state_dict)
    names = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder", "image_clip": "CLIP vision tower",
             "image_proj": "image resampler", "image_leftovers": "unused image-embedder leftovers",
             "schedule": "schedule buffers", "other": "other tensors"}
    schedule = config.schedule
    scaling = (f"use_scale, scale_b {schedule.scale_b}, scale_arr length {schedule.scale_arr_len}"
               if schedule.use_scale else "no signal scaling")
    lines = [
        f"file:      {path} ({human_size(path.stat().st_size)})",
        f"model:     {config.name} ({'image-to-video' if config.is_i2v else 'text-to-video'})",
        f"native:    {config.width}x{config.height}, {config.frames} frames, conditioning fps {config.fps}",
        f"schedule:  {schedule.timesteps} steps, linear betas {schedule.linear_start}..{schedule.linear_end}, {scaling}",
        "components:",
    ]
    for group, keys in groups.items():
        if not keys:
            continue
        numel = nbytes = 0
        dtypes = set()
        for key in keys.values():
            shape, dtype = shapes[key]
            n = 1
            for d in shape:
                n *= d
            numel += n
            nbytes += n * dtype.itemsize
            dtypes.add(str(dtype).removeprefix("torch."))
        lines.append(f"  {names[group]:<32} {len(keys):>5} tensors {numel / 1e6:>10,.1f} M values "
                     f"{human_size(nbytes):>11}  {'/'.join(sorted(dtypes))}")
    return "\n".join(lines)


def _shapes_and_dtypes(path: Path, state_dict) -> dict:
    """{key: (shape, dtype)} without reading tensor data (safetensors header, or the mapped pickle)."""
    if path.name.lower().endswith(SAFETENSORS_EXTENSIONS):
        from safetensors import safe_open

        from .checkpoint import with_unet_prefix

        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                view = f.get_slice(key)
                out[key] = (tuple(view.get_shape()), _safetensors_dtype(view.get_dtype()))
            return dict(with_unet_prefix(out))  # the names `state_dict` uses for a bare U-Net file
    return {key: (tuple(t.shape), t.dtype) for key, t in state_dict.items()}


def _safetensors_dtype(name: str) -> torch.dtype:
    return SAFETENSORS_DTYPES.get(name, torch.uint8)


# --------------------------------------------------------------------------------------------
# argument parsing


def _sampling_options(p: argparse.ArgumentParser, steps: int | None, out: str) -> None:
    p.add_argument("--height", type=int, help="video height in pixels, a multiple of 64 (default: the model's native)")
    p.add_argument("--width", type=int, help="video width in pixels, a multiple of 64 (default: the model's native)")
    p.add_argument("--frames", type=int, help="number of frames (default: 16, what the models were trained on)")
    p.add_argument("--fps", type=int,
                   help="conditioning fps, a motion-speed hint to the model (default: the model's, 28 T2V / 8 I2V)")
    p.add_argument("--steps", type=int, default=steps,
                   help=f"DDIM steps (default {steps or '50; with --turbo 4 for v1, 16 for v2'})")
    p.add_argument("--cfg", type=float, default=12.0, help="classifier-free guidance scale (default 12)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM noise amount, 0 = deterministic, 1 = official default (not a duration)")
    p.add_argument("--seed", type=int, default=123, help="random seed (default 123)")
    p.add_argument("--out", default=out, help=f"output .mp4 path (default {out})")
    p.add_argument("--save-fps", type=float, default=8, help="playback fps of the mp4 file (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vc_model",
                                     description="VideoCrafter1/2 text-to-video and image-to-video without ComfyUI.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="prompt (+ image for I2V) -> mp4 with a VideoCrafter checkpoint")
    p.add_argument("prompt", help="what the video shows")
    p.add_argument("--ckpt", required=True, help="VideoCrafter model.ckpt or converted .safetensors")
    p.add_argument("--image", help="input image for the image-to-video model")
    p.add_argument("--negative", help="negative prompt (default: the official empty prompt)")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="weight precision (auto: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    _sampling_options(p, steps=None, out="videocrafter.mp4")
    _long_video_options(p)
    # T2V-Turbo (few-step VideoCrafter2)
    p.add_argument("--turbo", help="T2V-Turbo file to apply to the VideoCrafter2 checkpoint: unet_lora.pt (v1), "
                                   "unet_mg.pt / unet_no_mg.pt (v2) or their converted .safetensors; samples with its "
                                   "own few-step sampler, without CFG (--cfg, --eta and --negative do not apply)")
    p.add_argument("--guidance", type=float, help="T2V-Turbo guidance scale w, an input of the model (default 7.5)")
    p.add_argument("--motion-guidance", type=float,
                   help="T2V-Turbo v2 motion guidance (default 0.05 for files with motion layers, as predict.py)")
    p.add_argument("--motion-percentage", type=float,
                   help="share of the T2V-Turbo v2 steps that get the motion guidance (default 0.5)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="run the whole pipeline on a tiny RANDOM model (no checkpoint needed)")
    p.add_argument("prompt", nargs="?", default="a red panda eating bamboo, cinematic")
    _sampling_options(p, steps=10, out="demo.mp4")
    _long_video_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help=".ckpt (or a T2V-Turbo unet_lora.pt / unet_mg.pt) -> .safetensors, verified")
    p.add_argument("ckpt", help="the .ckpt file, or a T2V-Turbo file (the v1 LoRA list gets keys lora.0000.up, ...)")
    p.add_argument("out", nargs="?", help="output .safetensors (default: <name>.<dtype>.safetensors beside it)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES),
                   help="precision to store (default fp16; T2V-Turbo files keep their own, float32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="which release a checkpoint is, and its component sizes")
    p.add_argument("ckpt", help="a .ckpt or .safetensors file")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if os.environ.get("VC_MODEL_DEBUG"):
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as error:  # UsageError, CheckpointError, the pipeline's own checks
        _say(f"error: {error}")
        return 2
    except torch.cuda.OutOfMemoryError:
        _say("error: the GPU ran out of memory. Lower --frames or --height/--width, use --dtype fp16 "
             "(or bf16), or close other programs using the GPU.")
        return 3
    except KeyboardInterrupt:
        _say("\ninterrupted: no output file was written.")
        return 130
