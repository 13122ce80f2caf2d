"""zimage_core: Z-Image-Turbo loading, prompt encoding, sampling and decoding, with no ComfyUI import."""

from .dtypes import ComponentDtype, DtypePolicy, resolve_policy
from .errors import GenerationCancelled, ZImageError
from .pipeline import GenerationResult, SpeedOptions, ZImage
from .sampler import flow_sigmas, initial_noise, sample

__all__ = [
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
__version__ = "0.1.0"

# Public for the ComfyUI nodes (appended): the download hints and the LATENT <-> model-space conversions.
from .formats import DOWNLOADS  # noqa: E402
from .vae import to_model_space, to_vae_space  # noqa: E402

__all__ += ["DOWNLOADS", "to_model_space", "to_vae_space"]
