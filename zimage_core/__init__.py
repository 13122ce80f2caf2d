"""zimage_core: Z-Image-Turbo loading, prompt encoding, sampling and decoding, with no ComfyUI import."""

from .errors import quiet_interrupt_while_starting as _quiet_interrupt

_quiet_interrupt()  # python -m zimage_core: Ctrl-C during the imports below is one line, exit 130

from .dtypes import ComponentDtype, DtypePolicy, resolve_policy
from .errors import GenerationCancelled, ZImageError
from .options import (ATTENTION_BACKENDS, COMPUTE_DTYPES, GUARD_POLICIES, LATENT_CHANNELS, MAX_BATCH, MAX_SIZE,
                      MAX_STEPS, MAX_TILE_SIZE, MIN_SIZE, MIN_STEPS, MIN_TILE_SIZE, OFFLOAD_MODES, SIZE_MULTIPLE,
                      STORAGE_DTYPES, TILE_SIZE_STEP)
from .pipeline import GenerationResult, SpeedOptions, ZImage
from .sampler import check_size, check_steps, initial_noise, sample
from .samplers import SAMPLERS
from .schedules import SCHEDULES, flow_sigmas, ksampler_sigmas

__all__ = [
    "ATTENTION_BACKENDS",
    "COMPUTE_DTYPES",
    "GUARD_POLICIES",
    "LATENT_CHANNELS",
    "MAX_BATCH",
    "MAX_SIZE",
    "MAX_STEPS",
    "MAX_TILE_SIZE",
    "MIN_SIZE",
    "MIN_STEPS",
    "MIN_TILE_SIZE",
    "OFFLOAD_MODES",
    "SIZE_MULTIPLE",
    "STORAGE_DTYPES",
    "TILE_SIZE_STEP",
    "SAMPLERS",
    "SCHEDULES",
    "ksampler_sigmas",
    "check_size",
    "check_steps",
    "ComponentDtype",
    "DtypePolicy",
    "GenerationCancelled",
    "GenerationResult",
    "ZImage",
    "SpeedOptions",
    "ZImageError",
    "flow_sigmas",
    "initial_noise",
    "resolve_policy",
    "sample",
]
__version__ = "0.2.0"

# Public for the ComfyUI nodes (appended): the download hints and the LATENT <-> model-space conversions.
from .formats import DOWNLOADS  # noqa: E402
from .vae import to_model_space, to_vae_space  # noqa: E402

__all__ += ["DOWNLOADS", "to_model_space", "to_vae_space"]

# Input checks for every entry point (appended): the API, the CLI and the nodes raise the same messages.
from .inputs import (check_batch_size, check_denoise, check_generate_args, check_guidance,  # noqa: E402
                     check_init_image, check_output_paths, check_prompts, check_seed, check_tile_args)

__all__ += ["check_batch_size", "check_denoise", "check_generate_args", "check_guidance", "check_init_image",
            "check_output_paths", "check_prompts", "check_seed", "check_tile_args"]

# ComfyUI's own Z-Image model and VAE (appended): our blocks and guard on its NextDiT, our exact tiles on its VAE.
from .native import CastWeights, NativeAccelerator, fp8_matmul_usable, zimage_reason  # noqa: E402
from .vae_convert import ExactTiledDecoder  # noqa: E402

__all__ += ["CastWeights", "NativeAccelerator", "fp8_matmul_usable", "zimage_reason", "ExactTiledDecoder"]

try:  # the experimental "fp8" attention backend registers itself; a torch without custom ops just lacks it
    from . import fp8_attention  # noqa: E402,F401
except Exception as _err:  # pragma: no cover - depends on the installed torch/Triton
    import logging as _logging

    _logging.getLogger("zimage_core").info("fp8 attention backend unavailable: %s", _err)
