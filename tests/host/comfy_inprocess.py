"""Checks of the VideoCrafter MODEL inside ComfyUI's own Python objects (no server), printed as JSON.

Run by test_model_management.py as `python comfy_inprocess.py WORKDIR` with the ComfyUI checkout as
the working directory and on PYTHONPATH (plus tests/ and the repository root). It loads tiny random
checkpoints with the pack's loader and reports, per model: ModelPatcher.load with a 30% budget
(where every weight-bearing module ended up, and the step against a full load), the same with a
LoRA, fp8 storage, LoRA formats and unpatching, the memory estimate and the attention function.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WORK = Path(sys.argv[1])
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's own argument parser: a CPU run
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.ldm.modules.attention  # noqa: E402
import comfy.lora  # noqa: E402
import vc_model  # noqa: E402
from pack_import import pack_module  # noqa: E402
from vc_model.config import tiny_config  # noqa: E402

loader = pack_module("nodes.loader")
lora = pack_module("nodes.lora")
CPU = torch.device("cpu")
CONFIGS = {"vc2": tiny_config(), "vc1": tiny_config(v1=True), "i2v": tiny_config(i2v=True)}
CAST_AT_USE = {"RelativePosition", "Resampler"}  # non-ops parameters, cast to the input where used


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(1, 4, 3, 8, 16, generator=g), "c_crossattn": torch.randn(1, 77, 64, generator=g),
           "fps": torch.tensor([8])}
    if config.image_encoder is not None:
        out["clip_tokens"] = torch.randn(1, 257, config.image_encoder.width, generator=g)
    return out


def step(patcher, data) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {k: v for k, v in data.items() if k != "x"}
        return patcher.model.apply_model(data["x"], torch.tensor([2.5]), **kwargs).float()


def placement(patcher) -> dict:
    """How ModelPatcher.load left each module holding its own parameters: loaded to the device
    (comfy_patched_weights), cast per call (comfy_cast_weights), cast where used (documented
    non-ops parameters), or stranded on the offload device with nothing to move it (a bug)."""
    counts = {"loaded": 0, "cast": 0, "cast_at_use": 0, "stranded": []}
    for name, module in patcher.model.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        if getattr(module, "comfy_patched_weights", False):
            counts["loaded"] += 1
        elif getattr(module, "comfy_cast_weights", False):
            counts["cast"] += 1
        elif type(module).__name__ in CAST_AT_USE:
            counts["cast_at_use"] += 1
        else:
            counts["stranded"].append(f"{name} ({type(module).__name__})")
    return counts


def kohya_lora(patcher, rank=2, seed=1) -> dict:
    """A kohya LoRA on every spatial and temporal attention q/v projection."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in patcher.model.state_dict().items():
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight")) and key.startswith("diffusion_model."):
            name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
            out[f"{name}.lora_down.weight"] = torch.randn(rank, value.shape[1], generator=g) * 0.3
            out[f"{name}.lora_up.weight"] = torch.randn(value.shape[0], rank, generator=g) * 0.3
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def peft_lora(patcher, rank=2, seed=2) -> dict:
    """A PEFT LoRA (VADER layout: base_model.model.model.diffusion_model.<path>.lora_A/lora_B, no alpha)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in patcher.model.state_dict().items():
        if key.endswith(("to_k.weight", "to_v.weight", "to_q.weight")) and key.startswith("diffusion_model.") \
                and "image_proj_model" not in key:
            name = "base_model.model.model.diffusion_model." + key[len("diffusion_model."):-len(".weight")]
            out[f"{name}.lora_A.weight"] = torch.randn(rank, value.shape[1], generator=g) * 0.3
            out[f"{name}.lora_B.weight"] = torch.randn(value.shape[0], rank, generator=g) * 0.3
    return out


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def check_model(name: str, path: Path) -> dict:
    config = CONFIGS[name]
    patcher, _, _, clip_vision, _ = loader.load_checkpoint(str(path), "fp32")
    data = inputs(config)
    result = {"attention": patcher.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.attention
              is comfy.ldm.modules.attention.optimized_attention}

    patcher.load(CPU, lowvram_model_memory=0, full_load=True)
    full = step(patcher, data)
    patcher.unpatch_model(CPU)
    size = patcher.model_size()
    patcher.load(CPU, lowvram_model_memory=int(0.3 * size))
    result["partial"] = {"lowvram": bool(patcher.model.model_lowvram), "placement": placement(patcher),
                         "loaded_fraction": patcher.model.model_loaded_weight_memory / size,
                         "diff": max_diff(step(patcher, data), full), "scale": float(full.abs().max())}
    patcher.unpatch_model(CPU)

    original = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    for kind, make in (("kohya", kohya_lora), ("peft", peft_lora)):
        patched = lora.apply_lora(patcher, make(patcher), 1.0)
        patched.load(CPU, lowvram_model_memory=0, full_load=True)
        with_lora = step(patched, data)
        patched.unpatch_model(CPU)
        patched.load(CPU, lowvram_model_memory=int(0.3 * size))
        partial = step(patched, data)
        patched.unpatch_model(CPU)
        restored = all(torch.equal(v, original[k]) for k, v in patcher.model.diffusion_model.state_dict().items())
        patcher.load(CPU, lowvram_model_memory=0, full_load=True)
        after = step(patcher, data)
        patcher.unpatch_model(CPU)
        result[kind] = {"patches": len(patched.patches), "change": max_diff(with_lora, full),
                        "partial_diff": max_diff(partial, with_lora), "restored": restored,
                        "after_unpatch_diff": max_diff(after, full)}

    fp8, _, _, _, _ = loader.load_checkpoint(str(path), "fp8_e4m3fn")
    fp8.load(CPU, lowvram_model_memory=0, full_load=True)
    out = step(fp8, data)
    dtypes = {str(p.dtype) for p in fp8.model.diffusion_model.parameters()}
    result["fp8"] = {"dtypes": sorted(dtypes), "manual_cast": str(fp8.model.manual_cast_dtype),
                     "finite": bool(torch.isfinite(out).all()),
                     "relative_error": max_diff(out, full) / float(full.abs().max())}
    result["memory_required"] = patcher.model.memory_required([2, 4, 16, 40, 64])
    result["clip_vision"] = type(clip_vision).__name__ if clip_vision is not None else None
    return result


def main() -> None:
    work = WORK
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, config in CONFIGS.items():
        path = work / f"tiny_{name}.safetensors"
        save_file({k: v.contiguous() for k, v in vc_model.random_state_dict(config, seed=7).items()}, str(path))
        results[name] = check_model(name, path)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
