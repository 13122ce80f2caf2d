"""The ComfyUI nodes of Z-Image Turbo: schemas here, the work in ``zimage_core``, the conversions in ``adapters``."""

from .accelerate import ZTurboAccelerate
from .api import ComfyExtension, io
from .conditioning import ZTurboTextEncode
from .guard import ZTurboPrecisionGuard
from .lora import ZTurboLoRA
from .native_vae import ZTurboNativeVAEDecodeTiled
from .loader import ZTurboDiffusersLoader, ZTurboFileLoader, ZTurboLoader, ZTurboLoadOptionsNode
from .sampler import ZTurboSampler
from .vae import ZTurboVAEDecode, ZTurboVAEDecodeTiled, ZTurboVAEEncode

NODES: list[type[io.ComfyNode]] = [
    ZTurboFileLoader,
    ZTurboDiffusersLoader,
    ZTurboLoadOptionsNode,
    ZTurboTextEncode,
    ZTurboSampler,
    ZTurboVAEDecode,
    ZTurboVAEDecodeTiled,
    ZTurboVAEEncode,
    ZTurboPrecisionGuard,
    ZTurboLoRA,
    ZTurboAccelerate,
    ZTurboNativeVAEDecodeTiled,
    ZTurboLoader,  # deprecated (hidden from search): the 0.1 loader, for saved workflows
]


class ZTurboExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
