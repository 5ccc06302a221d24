"""ComfyUI node pack for the VideoCrafter video diffusion models (VideoCrafter1 T2V 512/1024,
VideoCrafter2 T2V 512, VideoCrafter1 I2V 512).

ComfyUI imports this file from `custom_nodes/` and calls `comfy_entrypoint` (V3 node API); the
nodes live in `nodes/`, the models in `vc_model/` (pure PyTorch). Importing this module itself
needs no ComfyUI: the node modules are imported only when ComfyUI asks for them.
"""


async def comfy_entrypoint():
    from .nodes.definitions import extension

    return extension()
