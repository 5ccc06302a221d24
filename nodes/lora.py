"""LoRA on the VideoCrafter U-Net: ComfyUI's key formats plus PEFT's.

The core LoraLoader already reads LoRAs keyed like the model (`diffusion_model.<path>`, kohya
`lora_unet_<path with _>`), because the MODEL's keys are the official ones. PEFT files of the
official models (e.g. VADER's VideoCrafter2 LoRAs: `peft.get_peft_model(LatentDiffusion)`, saved
with `get_peft_model_state_dict`) name the official module paths under `base_model.model.`:
`base_model.model.model.diffusion_model.<path>.lora_A.weight` / `lora_B.weight` (or
`base_model.model.<path>` when the bare U-Net was wrapped). Load VideoCrafter LoRA adds those names
and applies the file through ComfyUI's own LoRA code (`comfy.lora`), so strength, partial loading
(LowVramPatch) and unpatching behave as for core LoRAs.

Scale: a `<name>.alpha` tensor in the file gives alpha / rank; without one the scale is 1 (alpha =
rank). PEFT keeps lora_alpha in adapter_config.json, not in the weights: if it differs from the
rank, set the strength to lora_alpha / r.
"""
from __future__ import annotations

PREFIX = "diffusion_model."
PROJ = "image_proj_model."


def peft_key_map(model_keys) -> dict[str, str]:
    """{PEFT module name: model weight key} for the MODEL's `diffusion_model.*.weight` keys."""
    out = {}
    for key in model_keys:
        if not (key.startswith(PREFIX) and key.endswith(".weight")):
            continue
        path = key[len(PREFIX):-len(".weight")]
        official = path if path.startswith(PROJ) else "model.diffusion_model." + path
        out["base_model.model." + official] = key
        if not path.startswith(PROJ):
            out["base_model.model." + path] = key
    return out


def apply_lora(model, lora: dict, strength: float):
    """A clone of ModelPatcher `model` with `lora` (any format above) added at `strength`."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map.update(peft_key_map(model.model.state_dict()))
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    if not patches:
        raise ValueError("No key of this LoRA names a layer of the VideoCrafter U-Net (kohya lora_unet_*, "
                         "diffusion_model.*, or PEFT base_model.model.*): it is for another model.")
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched
