"""Working out a ModelConfig: from the weights alone, or from an official YAML config.

`detect_config` reads channel widths, block counts and flags from key names and shapes, so the
four releases and any model built with the same code (the tiny test models included) are
recognised without file names. Attention head counts are not visible in shapes; they follow the
official head widths (text 64, CLIP vision 80, resampler 64; the U-Net's comes from `init_attn`).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from .checkpoint import COMPONENT_PREFIXES, CheckpointError, describe_state_dict, split_components
from .config import (
    RELEASES,
    ImageEncoderConfig,
    ModelConfig,
    ResamplerConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)

TEXT_HEAD_WIDTH = 64
VISION_HEAD_WIDTH = 80
RESAMPLER_HEAD_WIDTH = 64
UNET_HEAD_WIDTH = 64


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def detect_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Describe the model held by a state dict with official key names."""
    groups = split_components(state_dict)
    shape = lambda key: tuple(state_dict[key].shape)  # noqa: E731
    if not (groups["unet"] or groups["vae"] or groups["text_encoder"] or groups["image_clip"]):
        raise CheckpointError(
            f"This is {describe_state_dict(state_dict)}, not a VideoCrafter checkpoint: expected keys under "
            "model.diffusion_model., first_stage_model. and cond_stage_model.model.; use a VideoCrafter model.ckpt."
        )
    family = describe_state_dict(state_dict)
    if not family.startswith("a file with"):
        raise CheckpointError(f"This is {family}, not a VideoCrafter checkpoint: use a VideoCrafter model.ckpt.")
    try:
        unet = _detect_unet(groups["unet"], shape) if groups["unet"] else None
        vae = _detect_vae(groups["vae"], shape) if groups["vae"] else None
        text = _detect_text(groups["text_encoder"], shape) if groups["text_encoder"] else None
        image = None
        if groups["image_clip"] or groups["image_proj"]:
            image = _detect_image(groups, shape, state_dict)
    except (KeyError, StopIteration, IndexError) as error:
        raise CheckpointError(
            f"This looks like {family} but its layout is incomplete or unknown (no {error}); "
            "use a complete VideoCrafter checkpoint."
        ) from None
    schedule = _detect_schedule(state_dict)
    config = ModelConfig(name="custom VideoCrafter-style model", unet=unet, vae=vae, text_encoder=text,
                         image_encoder=image, schedule=schedule)
    return _name_release(config)


def _name_release(config: ModelConfig) -> ModelConfig:
    """Give a detected config the name and defaults of the release it matches, if any."""
    for release in RELEASES.values():
        same_unet = config.unet is None or config.unet == release.unet
        if same_unet and config.unet is not None and config.schedule == release.schedule:
            parts = [(config.vae, release.vae), (config.text_encoder, release.text_encoder),
                     (config.image_encoder, release.image_encoder)]
            if all(mine is None or mine == theirs for mine, theirs in parts):
                return replace(release, vae=config.vae, text_encoder=config.text_encoder,
                               image_encoder=config.image_encoder)
    i2v = config.unet is not None and config.unet.image_attention
    return replace(config, fps=8 if i2v else 28)


def _detect_unet(keys: Mapping[str, str], shape) -> UNetConfig:
    conv_in = shape(keys["input_blocks.0.0.weight"])
    model_channels, in_channels = conv_in[0], conv_in[1]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in keys]
    num_res_blocks = (downsamples[0] - 1) if downsamples else len(blocks) - 1
    levels = len(downsamples) + 1
    channel_mult, attention_resolutions = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out = shape(keys[f"input_blocks.{first}.0.in_layers.2.weight"])[0]
        channel_mult.append(out // model_channels)
        if f"input_blocks.{first}.1.norm.weight" in keys:
            attention_resolutions.append(2 ** level)
    context_dim = next(shape(full)[1] for k, full in keys.items() if k.endswith("attn2.to_k.weight")
                       and ".1.transformer_blocks." in k)
    relpos = [k for k in keys if k.endswith("relative_position_k.embeddings_table")]
    init_attn = "init_attn.0.proj_in.weight" in keys
    if init_attn:
        head_width = shape(keys["init_attn.0.proj_in.weight"])[0] // 8
    elif relpos:
        head_width = shape(keys[relpos[0]])[1]
    else:
        head_width = UNET_HEAD_WIDTH
    temporal_length = (shape(keys[relpos[0]])[0] - 1) // 2 if relpos else 16
    depth = len(_indices(keys, r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.")) or 1
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shape(keys["out.2.weight"])[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),
        num_res_blocks=num_res_blocks,
        num_head_channels=head_width,
        context_dim=context_dim,
        transformer_depth=depth,
        temporal_length=temporal_length,
        temporal_conv=any(".temopral_conv." in k for k in keys),
        relative_position=bool(relpos),
        fps_cond="fps_embedding.0.weight" in keys,
        image_attention=any(k.endswith("attn2.to_k_ip.weight") for k in keys),
        init_attn=init_attn,
        time_cond_proj_dim=shape(keys["time_cond_proj.weight"])[1] if "time_cond_proj.weight" in keys else None,
        motion_cond_proj_dim=shape(keys["motion_cond_proj.weight"])[1] if "motion_cond_proj.weight" in keys else None,
    )


def _detect_vae(keys: Mapping[str, str], shape) -> VAEConfig:
    ch = shape(keys["encoder.conv_in.weight"])[0]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(shape(keys[f"encoder.down.{i}.block.0.conv2.weight"])[0] // ch for i in levels)
    num_res_blocks = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    z_channels = shape(keys["decoder.conv_in.weight"])[1]
    resolution = 512
    attn = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in keys)
    return VAEConfig(
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn, resolution=resolution,
        in_channels=shape(keys["encoder.conv_in.weight"])[1], out_ch=shape(keys["decoder.conv_out.weight"])[0],
        z_channels=z_channels, embed_dim=shape(keys["post_quant_conv.weight"])[0],
        double_z=shape(keys["encoder.conv_out.weight"])[0] == 2 * z_channels,
    )


def _detect_text(keys: Mapping[str, str], shape) -> TextEncoderConfig:
    vocab, width = shape(keys["token_embedding.weight"])
    layers = len(_indices(keys, r"transformer\.resblocks\.(\d+)\."))
    mlp = shape(keys["transformer.resblocks.0.mlp.c_fc.weight"])[0]
    embed_dim = shape(keys["text_projection"])[-1] if "text_projection" in keys else width
    return TextEncoderConfig(width=width, heads=max(1, width // TEXT_HEAD_WIDTH), layers=layers,
                             context_length=shape(keys["positional_embedding"])[0], vocab_size=vocab,
                             mlp_ratio=mlp / width, embed_dim=embed_dim)


def _detect_image(groups, shape, state_dict) -> ImageEncoderConfig:
    clip, leftovers = groups["image_clip"], groups["image_leftovers"]
    if not clip or not groups["image_proj"]:
        missing = "embedder.model.visual.*" if not clip else "image_proj_model.*"
        raise CheckpointError(f"The image encoder is incomplete: no {missing} keys. Use the full VideoCrafter I2V checkpoint.")
    conv1 = shape(clip["conv1.weight"])
    width, patch = conv1[0], conv1[2]
    grid = int(round(math.sqrt(shape(clip["positional_embedding"])[0] - 1)))
    text = TextEncoderConfig(layers=0)
    if "embedder.model.token_embedding.weight" in leftovers:
        vocab, twidth = shape("embedder.model.token_embedding.weight")
        embed = shape("embedder.model.text_projection")[-1] if "embedder.model.text_projection" in leftovers else twidth
        text = TextEncoderConfig(width=twidth, heads=max(1, twidth // TEXT_HEAD_WIDTH), layers=0,
                                 context_length=shape("embedder.model.positional_embedding")[0],
                                 vocab_size=vocab, embed_dim=embed)
    return ImageEncoderConfig(
        width=width,
        layers=len(_indices(clip, r"transformer\.resblocks\.(\d+)\.")),
        heads=max(1, width // VISION_HEAD_WIDTH),
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=shape(clip["transformer.resblocks.0.mlp.c_fc.weight"])[0] / width,
        embed_dim=shape(clip["proj"])[1] if "proj" in clip else width,
        text=text,
        resampler=detect_resampler(state_dict),
    )


def detect_resampler(state_dict: Mapping[str, torch.Tensor]) -> ResamplerConfig:
    """Resampler sizes from `image_proj_model.*` shapes (the official code fixes them in code)."""
    p = COMPONENT_PREFIXES["image_proj"]
    shape = lambda key: tuple(state_dict[p + key].shape)  # noqa: E731
    _, queries, dim = shape("latents")
    inner = shape("layers.0.0.to_q.weight")[0]
    return ResamplerConfig(
        dim=dim,
        depth=len(_indices([k[len(p):] for k in state_dict if k.startswith(p)], r"layers\.(\d+)\.")),
        dim_head=RESAMPLER_HEAD_WIDTH if inner >= RESAMPLER_HEAD_WIDTH else inner,
        heads=max(1, inner // RESAMPLER_HEAD_WIDTH),
        num_queries=queries,
        embedding_dim=shape("proj_in.weight")[1],
        output_dim=shape("proj_out.weight")[0],
        ff_mult=shape("layers.0.1.1.weight")[0] // dim,
    )


def _detect_schedule(state_dict: Mapping[str, torch.Tensor]) -> ScheduleConfig:
    default = ScheduleConfig()
    timesteps = state_dict["betas"].shape[0] if "betas" in state_dict else default.timesteps
    start, end = default.linear_start, default.linear_end
    if "betas" in state_dict and not state_dict["betas"].is_meta:
        betas = state_dict["betas"].double()
        if not math.isclose(betas[0].item(), start, rel_tol=1e-4) or not math.isclose(betas[-1].item(), end, rel_tol=1e-4):
            start, end = round(betas[0].item(), 8), round(betas[-1].item(), 8)
    if "scale_arr" not in state_dict:
        return ScheduleConfig(timesteps=timesteps, linear_start=start, linear_end=end, use_scale=False)
    if state_dict["scale_arr"].is_meta:  # shapes only (a manifest): the releases' values by length
        fix = state_dict["scale_arr"].shape[0] == timesteps
        return ScheduleConfig(timesteps=timesteps, use_scale=True, scale_b=0.3 if fix else 0.7, fix_scale_bug=fix)
    arr = state_dict["scale_arr"].double()
    scale_a, scale_b = round(arr[0].item(), 6), round(arr[-1].item(), 6)
    mid_step = int((arr - arr[-1]).abs().gt(1e-6).sum().item()) + 1
    return ScheduleConfig(timesteps=timesteps, linear_start=start, linear_end=end, use_scale=True,
                          scale_a=scale_a, scale_b=scale_b, mid_step=mid_step,
                          fix_scale_bug=arr.shape[0] == timesteps)


# --------------------------------------------------------------------------------------------
# Official YAML configs


def config_from_official(params, open_clip_archs: Mapping[str, dict] | None = None) -> ModelConfig:
    """Read the `model.params` block of an official `configs/inference_*.yaml`.

    `params` is that block as a dict, a whole config dict (with `model.params`), or a YAML path.
    Any subset of `unet_config`, `first_stage_config`, `cond_stage_config` and `cond_img_config`
    may be present. `open_clip_archs` gives open_clip model configs for arch names open_clip does
    not know; an encoder whose arch is unknown is left out (None), which is fine when the state
    dict lacks it too. The resampler's sizes are not in the YAML; `build` takes them from the weights.
    """
    if isinstance(params, (str, os.PathLike)):
        import yaml

        with open(params) as f:
            params = yaml.safe_load(f)
    params = dict(params)
    if "model" in params and "params" in params["model"]:
        params = dict(params["model"]["params"])
    unet = vae = text = image = None
    if "unet_config" in params:
        unet = _unet_from_official(params["unet_config"].get("params", {}))
    if "first_stage_config" in params:
        vae = _vae_from_official(params["first_stage_config"].get("params", {}), params.get("scale_factor", 0.18215))
    if "cond_stage_config" in params:
        text = _text_from_official(params["cond_stage_config"].get("params", {}), open_clip_archs)
    if "cond_img_config" in params:
        image = _image_from_official(params["cond_img_config"].get("params", {}), open_clip_archs)
    default = ScheduleConfig()
    use_scale = bool(params.get("use_scale", False))
    schedule = ScheduleConfig(
        timesteps=int(params.get("timesteps", default.timesteps)),
        linear_start=float(params.get("linear_start", default.linear_start)),
        linear_end=float(params.get("linear_end", default.linear_end)),
        use_scale=use_scale,
        scale_a=float(params.get("scale_a", default.scale_a)),
        scale_b=float(params.get("scale_b", default.scale_b)),
        mid_step=int(params.get("mid_step", default.mid_step)),
        fix_scale_bug=bool(params.get("fix_scale_bug", False)),
    )
    for key, want in (("parameterization", "eps"), ("conditioning_key", "crossattn")):
        if params.get(key, want) != want:
            raise ValueError(f"Unsupported official config: {key}={params[key]!r}; VideoCrafter models use {want!r}.")
    config = ModelConfig(name="custom (official config)", unet=unet, vae=vae, text_encoder=text,
                         image_encoder=image, schedule=schedule)
    return _name_release(config)


def _unet_from_official(p: Mapping) -> UNetConfig:
    fixed = {"use_linear": True, "temporal_attention": True, "temporal_selfatt_only": True,
             "use_causal_attention": False, "use_scale_shift_norm": False, "resblock_updown": False,
             "dims": 2, "tempspatial_aware": False}
    for key, want in fixed.items():
        if key in p and (p[key] != want if key == "dims" else bool(p[key]) != want):
            raise ValueError(f"Unsupported U-Net option in the official config: {key}={p[key]!r} "
                             f"(every VideoCrafter release uses {want!r}).")
    if p.get("num_heads", -1) not in (-1, None) and "num_head_channels" not in p:
        raise ValueError("Unsupported U-Net option: num_heads without num_head_channels.")
    d = UNetConfig()
    return UNetConfig(
        in_channels=p.get("in_channels", d.in_channels),
        out_channels=p.get("out_channels", d.out_channels),
        model_channels=p.get("model_channels", d.model_channels),
        channel_mult=tuple(p.get("channel_mult", d.channel_mult)),
        attention_resolutions=tuple(p.get("attention_resolutions", d.attention_resolutions)),
        num_res_blocks=p.get("num_res_blocks", d.num_res_blocks),
        num_head_channels=p.get("num_head_channels", d.num_head_channels),
        context_dim=p.get("context_dim", d.context_dim),
        transformer_depth=p.get("transformer_depth", d.transformer_depth),
        temporal_length=p.get("temporal_length", d.temporal_length),
        temporal_conv=bool(p.get("temporal_conv", False)),
        relative_position=bool(p.get("use_relative_position", False)),
        fps_cond=bool(p.get("fps_cond", False)),
        image_attention=bool(p.get("use_image_attention", False)),
        init_attn=bool(p.get("addition_attention", False)),
        time_cond_proj_dim=p.get("time_cond_proj_dim"),
        motion_cond_proj_dim=p.get("motion_cond_proj_dim"),
    )


def _vae_from_official(p: Mapping, scale_factor: float) -> VAEConfig:
    dd = p.get("ddconfig", {})
    d = VAEConfig()
    return VAEConfig(
        ch=dd.get("ch", d.ch), ch_mult=tuple(dd.get("ch_mult", d.ch_mult)),
        num_res_blocks=dd.get("num_res_blocks", d.num_res_blocks),
        attn_resolutions=tuple(dd.get("attn_resolutions", d.attn_resolutions)),
        resolution=dd.get("resolution", d.resolution), in_channels=dd.get("in_channels", d.in_channels),
        out_ch=dd.get("out_ch", d.out_ch), z_channels=dd.get("z_channels", d.z_channels),
        embed_dim=p.get("embed_dim", d.embed_dim), double_z=dd.get("double_z", d.double_z),
        scale_factor=float(scale_factor),
    )


def _open_clip_cfg(arch: str, open_clip_archs: Mapping[str, dict] | None) -> dict | None:
    """open_clip's model config for `arch`, or None when neither open_clip nor the caller knows it."""
    if open_clip_archs and arch in open_clip_archs:
        return open_clip_archs[arch]
    import open_clip

    return open_clip.get_model_config(arch)


def _text_from_cfg(cfg: Mapping, skip: int) -> TextEncoderConfig:
    t = cfg["text_cfg"]
    width = t.get("width", 512)
    return TextEncoderConfig(width=width, heads=t.get("heads", 8), layers=t.get("layers", 12),
                             context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
                             mlp_ratio=t.get("mlp_ratio", 4.0), embed_dim=cfg.get("embed_dim", width),
                             skip_last_layers=skip)


def _text_from_official(p: Mapping, open_clip_archs) -> TextEncoderConfig:
    layer = p.get("layer", "last")
    if layer not in ("last", "penultimate"):
        raise ValueError(f"Unsupported text encoder layer {layer!r}: expected 'penultimate' or 'last'.")
    cfg = _open_clip_cfg(p.get("arch", "ViT-H-14"), open_clip_archs)
    return None if cfg is None else _text_from_cfg(cfg, 1 if layer == "penultimate" else 0)


def _image_from_official(p: Mapping, open_clip_archs) -> ImageEncoderConfig:
    cfg = _open_clip_cfg(p.get("arch", "ViT-H-14"), open_clip_archs)
    if cfg is None:
        return None
    v = cfg["vision_cfg"]
    width = v.get("width", 768)
    head_width = v.get("head_width", 64)
    return ImageEncoderConfig(
        width=width, layers=v.get("layers", 12), heads=max(1, width // head_width),
        patch_size=v.get("patch_size", 16), image_size=v.get("image_size", 224), mlp_ratio=v.get("mlp_ratio", 4.0),
        embed_dim=cfg.get("embed_dim", width), text=replace(_text_from_cfg(cfg, 1), layers=0),
    )
