"""VideoCrafter1/2 text-to-video and image-to-video models in plain PyTorch.

    import vc_model
    sd = vc_model.load_state_dict("model.ckpt")
    bundle = vc_model.build(sd, dtype=torch.bfloat16, device="cuda")
    video = vc_model.generate(bundle, "a corgi running on the beach", seed=123)

Nothing here imports ComfyUI; the node pack in `nodes/` wraps these pieces.
"""
from .build import Bundle, build, expected_shapes, load, random_state_dict
from .checkpoint import CheckpointError, lazy_state_dict, load_state_dict
from .config import RELEASES, ModelConfig, tiny_config
from .detect import config_from_official, detect_config
from .freenoise import reschedule_noise
from .pipeline import generate
from .sampling import ddim_timesteps, sample_ddim
from .schedule import Schedule
from .turbo import TurboError, apply_turbo, load_turbo
from .turbo_sampler import sample_turbo, turbo_timesteps

__all__ = [
    "Bundle", "CheckpointError", "ModelConfig", "RELEASES", "Schedule", "build", "config_from_official",
    "ddim_timesteps", "detect_config", "expected_shapes", "generate", "lazy_state_dict", "load",
    "load_state_dict", "random_state_dict", "reschedule_noise", "sample_ddim", "tiny_config",
    "TurboError", "apply_turbo", "load_turbo", "sample_turbo", "turbo_timesteps",
]
