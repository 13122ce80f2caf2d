"""The ComfyUI nodes of Z-Image Turbo: schemas here, the work in ``zimage_core``."""

from .api import ComfyExtension, io
from .conditioning import ZTurboTextEncode
from .guard import ZTurboPrecisionGuard
from .loader import ZTurboLoader
from .sampler import ZTurboSampler
from .vae import ZTurboVAEDecode, ZTurboVAEDecodeTiled, ZTurboVAEEncode

NODES: list[type[io.ComfyNode]] = [
    ZTurboLoader,
    ZTurboTextEncode,
    ZTurboSampler,
    ZTurboVAEDecode,
    ZTurboVAEDecodeTiled,
    ZTurboVAEEncode,
    ZTurboPrecisionGuard,
]


class ZTurboExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
