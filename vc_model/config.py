"""Model descriptions: one small dataclass per component, one ModelConfig per release.

Every size the modules need is here, so the same code builds the real models and the tiny
random ones the tests use. The four released configurations are the presets at the bottom.
Detection from a state dict and reading official YAML configs live in `detect.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class UNetConfig:
    """The 3D U-Net (`model.diffusion_model.*`)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that carry transformers
    num_res_blocks: int = 2
    num_head_channels: int = 64  # width of one attention head; heads = channels // this
    context_dim: int = 1024  # width of text (and image) tokens
    transformer_depth: int = 1
    temporal_length: int = 16  # frames the relative position table was built for
    temporal_conv: bool = False  # VC2 / I2V: `temopral_conv` (sic) in every ResBlock
    relative_position: bool = False  # VC1 T2V: relative position tables in temporal attention
    fps_cond: bool = False  # `fps_embedding` added to the time embedding
    image_attention: bool = False  # I2V: decoupled image cross-attention (`to_k_ip`, `to_v_ip`)
    init_attn: bool = True  # `addition_attention`: temporal transformer right after conv_in
    init_attn_heads: int = 8  # init_attn uses 8 heads of num_head_channels, whatever the width
    # T2V-Turbo (vc_model.turbo): width of the guidance embedding fed to `time_cond_proj` (256), and of the
    # v2 motion-guidance embedding fed to `motion_cond_proj` (+ `combine_proj`). None: no such layers.
    time_cond_proj_dim: int | None = None
    motion_cond_proj_dim: int | None = None

    def __post_init__(self):
        # Order carries no meaning; keep one canonical form so configs compare equal.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(self.attention_resolutions, reverse=True)))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class VAEConfig:
    """The per-frame KL autoencoder (`first_stage_model.*`)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 512  # only used to place attn_resolutions
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    scale_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """OpenCLIP text tower (`cond_stage_model.model.*`), read at the penultimate layer."""

    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    embed_dim: int = 1024  # text_projection output width (kept in the checkpoint, unused)
    skip_last_layers: int = 1  # "penultimate": the last block is not run, ln_final still is


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver resampler from CLIP patch tokens to image context tokens (`image_proj_model.*`)."""

    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280  # CLIP vision width
    output_dim: int = 1024  # = U-Net context_dim
    ff_mult: int = 4


@dataclass(frozen=True)
class ImageEncoderConfig:
    """OpenCLIP vision tower (`embedder.model.visual.*`) plus the resampler, for I2V.

    The official embedder keeps a few text-tower leftovers in the checkpoint
    (`embedder.model.token_embedding.weight`, ...). They are never used; their sizes are
    described by `text` (with 0 layers: the blocks are deleted) so a strict key check can name them.
    """

    width: int = 1280
    layers: int = 32
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    mlp_ratio: float = 4.0
    embed_dim: int = 1024  # visual.proj output width (unused: tokens are taken before ln_post)
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(layers=0))  # blocks deleted
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear beta schedule and the `use_scale` signal scaling (top-level buffers)."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    use_scale: bool = False
    scale_a: float = 1.0
    scale_b: float = 0.3
    mid_step: int = 400
    fix_scale_bug: bool = False  # False keeps the official 1400-long `scale_arr`

    @property
    def scale_arr_len(self) -> int:
        if not self.use_scale:
            return 0
        return self.timesteps if self.fix_scale_bug else self.mid_step + self.timesteps


@dataclass(frozen=True)
class ModelConfig:
    """A whole VideoCrafter model. Components that a state dict lacks are None."""

    name: str
    unet: UNetConfig | None = None
    vae: VAEConfig | None = None
    text_encoder: TextEncoderConfig | None = None
    image_encoder: ImageEncoderConfig | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    height: int = 320  # native pixel size
    width: int = 512
    frames: int = 16
    fps: int = 28  # conditioning fps the official scripts use

    @property
    def is_i2v(self) -> bool:
        return self.image_encoder is not None or (self.unet is not None and self.unet.image_attention)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


# The four releases. Differences are listed in shared/notes/videocrafter-spec.md section 1.1.
VC1_T2V_512 = ModelConfig(
    name="VideoCrafter1 T2V 512",
    unet=UNetConfig(relative_position=True),
    vae=VAEConfig(),
    text_encoder=TextEncoderConfig(),
    schedule=ScheduleConfig(use_scale=False),
    fps=24,
)
VC1_T2V_1024 = ModelConfig(
    name="VideoCrafter1 T2V 1024",
    unet=UNetConfig(relative_position=True, fps_cond=True),
    vae=VAEConfig(),
    text_encoder=TextEncoderConfig(),
    schedule=ScheduleConfig(use_scale=True, scale_b=0.3, fix_scale_bug=True),
    height=576,
    width=1024,
    fps=28,
)
VC2_T2V_512 = ModelConfig(
    name="VideoCrafter2 T2V 512",
    unet=UNetConfig(temporal_conv=True, fps_cond=True),
    vae=VAEConfig(),
    text_encoder=TextEncoderConfig(),
    schedule=ScheduleConfig(use_scale=True, scale_b=0.7),
    fps=28,
)
VC1_I2V_512 = ModelConfig(
    name="VideoCrafter1 I2V 512",
    unet=UNetConfig(temporal_conv=True, fps_cond=True, image_attention=True),
    vae=VAEConfig(),
    text_encoder=TextEncoderConfig(),
    image_encoder=ImageEncoderConfig(),
    schedule=ScheduleConfig(use_scale=True, scale_b=0.7),
    fps=8,
)

RELEASES: dict[str, ModelConfig] = {
    "vc1_t2v_512": VC1_T2V_512,
    "vc1_t2v_1024": VC1_T2V_1024,
    "vc2_t2v_512": VC2_T2V_512,
    "vc1_i2v_512": VC1_I2V_512,
}


def tiny_config(i2v: bool = False, v1: bool = False) -> ModelConfig:
    """A few-MB model with every block type of a release, for tests, the demo and host tests.

    `v1` gives the VideoCrafter1 T2V flags (relative position, no temporal conv); otherwise the
    VideoCrafter2 flags, plus image attention and an image encoder for `i2v`. Attention head widths
    follow the official ones (64 for text, 80 for CLIP vision, 64 for the resampler; the U-Net's is
    read from `init_attn`), so `detect_config` recognises these models from their weights alone.
    """
    unet = UNetConfig(
        model_channels=32,
        channel_mult=(1, 1, 2),
        attention_resolutions=(1, 2),
        num_res_blocks=1,
        num_head_channels=16,
        context_dim=64,
        temporal_length=8 if v1 else 16,  # only the relative position table depends on it
        temporal_conv=not v1,
        relative_position=v1,
        fps_cond=True,
        image_attention=i2v,
    )
    text = TextEncoderConfig(width=64, heads=1, layers=3, embed_dim=64)
    image = None
    if i2v:
        image = ImageEncoderConfig(
            width=80, layers=2, heads=1, patch_size=32, image_size=224, embed_dim=64, text=replace(text, layers=0),
            resampler=ResamplerConfig(dim=64, depth=2, dim_head=64, heads=1, num_queries=4,
                                      embedding_dim=80, output_dim=64, ff_mult=2),
        )
    return ModelConfig(
        name="tiny " + ("I2V" if i2v else "T2V v1" if v1 else "T2V v2"),
        unet=unet,
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text_encoder=text,
        image_encoder=image,
        schedule=ScheduleConfig(use_scale=False) if v1 else ScheduleConfig(use_scale=True, scale_b=0.7),
        height=64,
        width=128,
        frames=4,
        fps=8 if i2v else 28,
    )
