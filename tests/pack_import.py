"""Import the node pack's modules without ComfyUI, the way ComfyUI imports the pack.

ComfyUI loads the repository root as a package, so `nodes/` uses relative imports (`..vc_model`).
Tests of host-free node logic import those modules through this package name.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_videocrafter_under_test"


def pack_module(name: str):
    """Import `<pack>.<name>` with the repository root as a package (relative imports, no ComfyUI)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")
