"""ComfyUI entry point of the Z-Image Turbo node pack (a V3 extension: ``comfy_entrypoint``).

Importing this file does nothing else: ComfyUI's modules and the nodes are imported only when ComfyUI calls
``comfy_entrypoint``, so tools that import the repository root as a package (pytest does) need no ComfyUI.
"""

import importlib.util
import logging
import os
import sys


def _load_core() -> None:
    """Import the bundled ``zimage_core`` as a top-level package without putting this folder on ``sys.path``
    (which would let its other folders, e.g. ``nodes`` or ``tests``, shadow modules of ComfyUI or other packs)."""
    core = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zimage_core")
    loaded = sys.modules.get("zimage_core")
    if loaded is not None:
        if os.path.dirname(os.path.abspath(loaded.__file__)) != core:
            logging.warning("Z-Image Turbo: using zimage_core from %s, not the bundled %s", loaded.__file__, core)
        return
    spec = importlib.util.spec_from_file_location("zimage_core", os.path.join(core, "__init__.py"),
                                                  submodule_search_locations=[core])
    module = importlib.util.module_from_spec(spec)
    sys.modules["zimage_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["zimage_core"]
        raise


WEB_DIRECTORY = "./web"  # web/zturbo.js: hides the sampler's size widgets while a latent is connected


async def comfy_entrypoint():
    _load_core()
    from .nodes import ZTurboExtension

    return ZTurboExtension()
