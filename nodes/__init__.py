"""ComfyUI integration of `vc_model`.

The only code of the project that imports ComfyUI (`comfy`, `comfy_api`, `folder_paths`, ...).
Pure helpers that need no host (`logic.py`, `sigmas.py`, `diffusion.py`) import no ComfyUI module,
so tests can run them without a ComfyUI checkout. The node classes are in `definitions.py`; the
pack's root `__init__.py` imports it only when ComfyUI asks for the node list.
"""
