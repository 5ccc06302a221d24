"""Working out a ModelConfig: from the weights alone, or from an official YAML config.

`detect_config` reads channel widths, block counts and flags from key names and shapes, so the
four releases and any model built with the same code (the tiny test models included) are
recognised without file names. Each width is what most of the tensors carrying it say, so a single
damaged or edited tensor cannot change the detected model: the strict checks of `build` name it.
Attention head counts are not visible in shapes; they follow the official head widths (text 64,
CLIP vision 80, resampler 64; the U-Net's comes from `init_attn`).
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

import torch

from .checkpoint import COMPONENT_PREFIXES, CheckpointError, describe_state_dict, split_components, with_unet_prefix
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
    """Describe the model held by a state dict with official key names.

    Every size is read by majority over the tensors that carry it (`Sizes`), so one damaged or
    edited tensor does not change the detected model; `build` then names that tensor. A file without
    the schedule buffers (a U-Net-only file, or a conversion that dropped them) gets the schedule of
    the release its U-Net is. A U-Net-only file may lack the `model.diffusion_model.` prefix.
    """
    state_dict = with_unet_prefix(state_dict)
    groups = split_components(state_dict)
    if not (groups["unet"] or groups["vae"] or groups["text_encoder"] or groups["image_clip"]):
        raise CheckpointError(
            f"This is {describe_state_dict(state_dict)}, not a VideoCrafter checkpoint: expected keys under "
            "model.diffusion_model., first_stage_model. and cond_stage_model.model.; use a VideoCrafter model.ckpt."
        )
    family = describe_state_dict(state_dict)
    if not family.startswith("a file with"):
        raise CheckpointError(f"This is {family}, not a VideoCrafter checkpoint: use a VideoCrafter model.ckpt.")
    try:
        unet = _detect_unet(groups["unet"], Sizes(state_dict, COMPONENT_PREFIXES["unet"])) if groups["unet"] else None
        vae = _detect_vae(groups["vae"], Sizes(state_dict, COMPONENT_PREFIXES["vae"])) if groups["vae"] else None
        text = None
        if groups["text_encoder"]:
            text = _detect_text(groups["text_encoder"], Sizes(state_dict, COMPONENT_PREFIXES["text_encoder"]))
        image = None
        if groups["image_clip"] or groups["image_proj"]:
            image = _detect_image(groups, state_dict)
    except (KeyError, StopIteration, IndexError) as error:
        raise CheckpointError(
            f"This looks like {family} but its layout is incomplete or unknown (no {error}); "
            "use a complete VideoCrafter checkpoint."
        ) from None
    schedule = _detect_schedule(state_dict, groups["schedule"]) if groups["schedule"] else None
    config = ModelConfig(name="custom VideoCrafter-style model", unet=unet, vae=vae, text_encoder=text,
                         image_encoder=image, schedule=schedule or ScheduleConfig())
    return _name_release(config, schedule_known=schedule is not None)


def _name_release(config: ModelConfig, schedule_known: bool = True) -> ModelConfig:
    """Give a detected config the name and defaults of the release it matches, if any.

    Without schedule buffers (`schedule_known` False) the U-Net alone decides, and the release's
    schedule is taken: the four released U-Nets all differ."""
    for release in RELEASES.values():
        same_unet = config.unet is None or config.unet == release.unet
        same_schedule = config.schedule == release.schedule or not schedule_known
        if same_unet and config.unet is not None and same_schedule:
            parts = [(config.vae, release.vae), (config.text_encoder, release.text_encoder),
                     (config.image_encoder, release.image_encoder)]
            if all(mine is None or mine == theirs for mine, theirs in parts):
                return replace(release, vae=config.vae, text_encoder=config.text_encoder,
                               image_encoder=config.image_encoder)
    i2v = config.unet is not None and config.unet.image_attention
    return replace(config, fps=8 if i2v else 28)


class Sizes:
    """Sizes read from the shapes of the tensors under one key prefix, each by majority.

    A size that several tensors carry (a block's width is the output of its conv, the length of its
    bias and of the norms around it) is what most of them say, so one damaged or hand-edited tensor
    cannot change the detected model; the strict shape check that follows names that tensor.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], prefix: str = ""):
        self.state_dict, self.prefix = state_dict, prefix

    def has(self, key: str) -> bool:
        return self.prefix + key in self.state_dict

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state_dict[self.prefix + key].shape)

    def vote(self, *sources) -> int:
        """The most common `shape(key)[axis] // divisor` over the `(key, axis[, divisor])` sources that
        are present (a plain int is a value known otherwise); on a tie the earliest source wins.
        KeyError naming the first key if no source is present."""
        values = []
        for source in sources:
            if isinstance(source, int):
                values.append(source)
                continue
            key, axis, *divisor = source
            if self.has(key) and len(self.shape(key)) > axis:
                values.append(self.shape(key)[axis] // (divisor[0] if divisor else 1))
        if not values:
            raise KeyError(self.prefix + sources[0][0])
        counts = Counter(values)
        return max(values, key=counts.__getitem__)  # max keeps the first of equals


def _detect_unet(keys: Mapping[str, str], sizes: Sizes) -> UNetConfig:
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in keys]
    num_res_blocks = (downsamples[0] - 1) if downsamples else len(blocks) - 1
    levels = len(downsamples) + 1
    model_channels = sizes.vote(("input_blocks.0.0.weight", 0), ("input_blocks.0.0.bias", 0),
                                ("time_embed.0.weight", 1), ("fps_embedding.0.weight", 1), ("out.0.weight", 0),
                                ("out.0.bias", 0), ("out.2.weight", 1))
    # latent channels: the VideoCrafter U-Nets predict noise of their input's shape
    channels = sizes.vote(("input_blocks.0.0.weight", 1), ("out.2.weight", 0), ("out.2.bias", 0))
    channel_mult, attention_resolutions = [], []
    for level in range(levels):
        first = f"input_blocks.{1 + level * (num_res_blocks + 1)}."
        width = sizes.vote(*((first + "0." + name, 0) for name in (
            "in_layers.2.weight", "in_layers.2.bias", "emb_layers.1.weight", "emb_layers.1.bias", "out_layers.0.weight",
            "out_layers.3.weight", "out_layers.3.bias")))
        channel_mult.append(width // model_channels)
        if first + "1.norm.weight" in keys:
            attention_resolutions.append(2 ** level)
    spatial = [k for k in keys if ".1.transformer_blocks." in k and k.endswith(("attn2.to_k.weight",
                                                                                  "attn2.to_v.weight"))]
    if not spatial:
        raise KeyError("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    context_dim = sizes.vote(*((k, 1) for k in spatial))
    tables = [k for k in keys if k.endswith(("relative_position_k.embeddings_table",
                                             "relative_position_v.embeddings_table"))]
    init_attn = "init_attn.0.proj_in.weight" in keys
    heads = UNetConfig().init_attn_heads
    if init_attn:
        head_width = sizes.vote(("init_attn.0.proj_in.weight", 0, heads), ("init_attn.0.proj_in.bias", 0, heads),
                                ("init_attn.0.proj_out.weight", 1, heads),
                                ("init_attn.0.transformer_blocks.0.norm1.weight", 0, heads))
    elif tables:
        head_width = sizes.vote(*((k, 1) for k in tables))
    else:
        head_width = UNET_HEAD_WIDTH
    temporal_length = (sizes.vote(*((k, 0) for k in tables)) - 1) // 2 if tables else 16
    depth = len(_indices(keys, r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.")) or 1
    return UNetConfig(
        in_channels=channels,
        out_channels=channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),
        num_res_blocks=num_res_blocks,
        num_head_channels=head_width,
        context_dim=context_dim,
        transformer_depth=depth,
        temporal_length=temporal_length,
        temporal_conv=any(".temopral_conv." in k for k in keys),
        relative_position=bool(tables),
        fps_cond="fps_embedding.0.weight" in keys,
        image_attention=any(k.endswith("attn2.to_k_ip.weight") for k in keys),
        init_attn=init_attn,
        time_cond_proj_dim=shape(keys["time_cond_proj.weight"])[1] if "time_cond_proj.weight" in keys else None,
        motion_cond_proj_dim=shape(keys["motion_cond_proj.weight"])[1] if "motion_cond_proj.weight" in keys else None,
    )


def _detect_vae(keys: Mapping[str, str], sizes: Sizes) -> VAEConfig:
    ch = sizes.vote(("encoder.conv_in.weight", 0), ("encoder.conv_in.bias", 0),
                    ("encoder.down.0.block.0.norm1.weight", 0), ("encoder.down.0.block.0.conv1.weight", 1))
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(sizes.vote(*((f"encoder.down.{i}.block.0.{name}", 0) for name in (
        "conv2.weight", "conv2.bias", "norm2.weight", "conv1.weight", "conv1.bias"))) // ch for i in levels)
    num_res_blocks = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    z_channels = sizes.vote(("decoder.conv_in.weight", 1), ("post_quant_conv.weight", 0), ("post_quant_conv.bias", 0))
    embed_dim = sizes.vote(("post_quant_conv.weight", 1), ("quant_conv.weight", 0, 2), ("quant_conv.bias", 0, 2))
    encoded = sizes.vote(("encoder.conv_out.weight", 0), ("encoder.conv_out.bias", 0), ("quant_conv.weight", 1))
    rgb = sizes.vote(("encoder.conv_in.weight", 1), ("decoder.conv_out.weight", 0), ("decoder.conv_out.bias", 0))
    resolution = 512
    attn = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in keys)
    return VAEConfig(
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn, resolution=resolution,
        in_channels=rgb, out_ch=rgb, z_channels=z_channels, embed_dim=embed_dim, double_z=encoded == 2 * z_channels,
    )


def _text_width(sizes: Sizes, layers: list[int]) -> int:
    return sizes.vote(("token_embedding.weight", 1), ("positional_embedding", 1), ("ln_final.weight", 0),
                      ("ln_final.bias", 0), ("text_projection", 0),
                      *((f"transformer.resblocks.{i}.ln_1.weight", 0) for i in layers))


def _mlp_width(sizes: Sizes, layers: list[int]) -> int:
    return sizes.vote(*(source for i in layers for source in (
        (f"transformer.resblocks.{i}.mlp.c_fc.weight", 0), (f"transformer.resblocks.{i}.mlp.c_fc.bias", 0),
        (f"transformer.resblocks.{i}.mlp.c_proj.weight", 1))))


def _detect_text(keys: Mapping[str, str], sizes: Sizes) -> TextEncoderConfig:
    """Vocabulary and context length are the OpenCLIP tokenizer's (49408 tokens, 77 positions), which
    every VideoCrafter text tower uses: they are not read from the file, so a damaged embedding is named."""
    layers = _indices(keys, r"transformer\.resblocks\.(\d+)\.")
    width = _text_width(sizes, layers)
    embed_dim = sizes.vote(("text_projection", 1)) if sizes.has("text_projection") else width
    return TextEncoderConfig(width=width, heads=max(1, width // TEXT_HEAD_WIDTH), layers=len(layers),
                             mlp_ratio=_mlp_width(sizes, layers) / width, embed_dim=embed_dim)


def _detect_image(groups, state_dict) -> ImageEncoderConfig:
    """The CLIP vision tower; its input size is the official 224 pixels (the image is squashed to it)."""
    clip, leftovers = groups["image_clip"], groups["image_leftovers"]
    if not clip or not groups["image_proj"]:
        missing = "embedder.model.visual.*" if not clip else "image_proj_model.*"
        raise CheckpointError(f"The image encoder is incomplete: no {missing} keys. Use the full VideoCrafter I2V checkpoint.")
    sizes = Sizes(state_dict, COMPONENT_PREFIXES["image_clip"])
    layers = _indices(clip, r"transformer\.resblocks\.(\d+)\.")
    width = _vision_width(sizes, layers)
    image_size = ImageEncoderConfig().image_size
    tokens = sizes.shape("positional_embedding")[:1] if sizes.has("positional_embedding") else ()
    grid = math.isqrt(tokens[0] - 1) if tokens and tokens[0] > 1 else 0
    patch = sizes.vote(("conv1.weight", 2), ("conv1.weight", 3), *([image_size // grid] if grid else []))
    text = TextEncoderConfig(layers=0)
    if "embedder.model.token_embedding.weight" in leftovers:
        twidth = _text_width(Sizes(state_dict, "embedder.model."), [])
        projection = "embedder.model.text_projection"
        embed = state_dict[projection].shape[-1] if projection in leftovers else twidth
        text = TextEncoderConfig(width=twidth, heads=max(1, twidth // TEXT_HEAD_WIDTH), layers=0, embed_dim=embed)
    return ImageEncoderConfig(
        width=width,
        layers=len(layers),
        heads=max(1, width // VISION_HEAD_WIDTH),
        patch_size=patch,
        image_size=image_size,
        mlp_ratio=_mlp_width(sizes, layers) / width,
        embed_dim=sizes.shape("proj")[1] if sizes.has("proj") else width,
        text=text,
        resampler=detect_resampler(state_dict),
    )


def _vision_width(sizes: Sizes, layers: list[int]) -> int:
    return sizes.vote(("conv1.weight", 0), ("class_embedding", 0), ("ln_pre.weight", 0), ("ln_pre.bias", 0),
                      ("positional_embedding", 1), ("ln_post.weight", 0), ("proj", 0),
                      *((f"transformer.resblocks.{i}.ln_1.weight", 0) for i in layers))


def detect_resampler(state_dict: Mapping[str, torch.Tensor]) -> ResamplerConfig:
    """Resampler sizes from `image_proj_model.*` shapes (the official code fixes them in code)."""
    p = COMPONENT_PREFIXES["image_proj"]
    sizes = Sizes(state_dict, p)
    layers = _indices([k[len(p):] for k in state_dict if k.startswith(p)], r"layers\.(\d+)\.")
    dim = sizes.vote(("latents", 2), ("proj_in.weight", 0), ("proj_in.bias", 0), ("proj_out.weight", 1),
                     *(source for i in layers for source in (
                         (f"layers.{i}.0.norm1.weight", 0), (f"layers.{i}.0.to_q.weight", 1),
                         (f"layers.{i}.0.to_out.weight", 0), (f"layers.{i}.1.0.weight", 0))))
    inner = sizes.vote(*(source for i in layers for source in (
        (f"layers.{i}.0.to_q.weight", 0), (f"layers.{i}.0.to_kv.weight", 0, 2), (f"layers.{i}.0.to_out.weight", 1))))
    hidden = sizes.vote(*(source for i in layers for source in ((f"layers.{i}.1.1.weight", 0), (f"layers.{i}.1.3.weight", 1))))
    # the resampler reads the CLIP tower's tokens: its input width is the tower's, when the file has it
    clip_prefix = COMPONENT_PREFIXES["image_clip"]
    clip_layers = _indices([k[len(clip_prefix):] for k in state_dict if k.startswith(clip_prefix)],
                           r"transformer\.resblocks\.(\d+)\.")
    clip_width = [_vision_width(Sizes(state_dict, clip_prefix), clip_layers)] if any(
        k.startswith(clip_prefix) for k in state_dict) else []
    embedding = sizes.vote(*clip_width, ("proj_in.weight", 1))
    return ResamplerConfig(
        dim=dim,
        depth=len(layers),
        dim_head=RESAMPLER_HEAD_WIDTH if inner >= RESAMPLER_HEAD_WIDTH else inner,
        heads=max(1, inner // RESAMPLER_HEAD_WIDTH),
        num_queries=sizes.shape("latents")[1],
        embedding_dim=embedding,
        output_dim=sizes.vote(("proj_out.weight", 0), ("proj_out.bias", 0), ("norm_out.weight", 0), ("norm_out.bias", 0)),
        ff_mult=hidden // dim,
    )


def _detect_schedule(state_dict: Mapping[str, torch.Tensor], buffers) -> ScheduleConfig:
    """The schedule the buffers describe. Buffers stored in half precision (a whole file cast to fp16)
    are read to their precision, so they still name the release their values round from."""
    default = ScheduleConfig()
    lengths = [(k, 0) for k in buffers if k != "scale_arr"]
    timesteps = Sizes(state_dict).vote(*lengths) if lengths else default.timesteps
    start, end = default.linear_start, default.linear_end
    betas_ok = "betas" in state_dict and tuple(state_dict["betas"].shape) == (timesteps,)  # else damaged: named later
    if betas_ok and not state_dict["betas"].is_meta and state_dict["betas"].dtype.is_floating_point:
        betas, tol, digits = _values(state_dict["betas"])
        if not math.isclose(betas[0], start, rel_tol=tol) or not math.isclose(betas[-1], end, rel_tol=tol):
            start, end = round(betas[0], digits + 2), round(betas[-1], digits + 2)
    if "scale_arr" not in state_dict:
        return ScheduleConfig(timesteps=timesteps, linear_start=start, linear_end=end, use_scale=False)
    scale = state_dict["scale_arr"]
    if scale.is_meta or not scale.dtype.is_floating_point or not scale.numel():
        # shapes only (a manifest), or values that cannot be read (damaged): the releases' values by length
        fix = scale.numel() == timesteps
        return ScheduleConfig(timesteps=timesteps, use_scale=True, scale_b=0.3 if fix else 0.7, fix_scale_bug=fix)
    arr, tol, digits = _values(scale)
    mid_step = sum(1 for value in arr if abs(value - arr[-1]) > 1e-6) + 1  # the ramp's steps exceed any rounding
    fix = len(arr) == timesteps
    if not fix and len(arr) != mid_step + timesteps:  # a length no schedule has (damaged): the releases' ramp
        mid_step = default.mid_step
    return ScheduleConfig(timesteps=timesteps, linear_start=start, linear_end=end, use_scale=True,
                          scale_a=round(arr[0], digits), scale_b=round(arr[-1], digits), mid_step=mid_step,
                          fix_scale_bug=fix)


def _values(buffer: torch.Tensor) -> tuple[list[float], float, int]:
    """A buffer's values, the relative tolerance its dtype keeps and the decimals worth reading
    (6 for float32; 3 for float16; 2 for bfloat16)."""
    eps = torch.finfo(buffer.dtype).eps if buffer.dtype.is_floating_point else 0.0
    return buffer.double().flatten().tolist(), max(1e-4, 2 * eps), min(6, int(-math.log10(eps))) if eps else 6


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
