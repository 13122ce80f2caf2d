"""Per-step callback of the Z-Image Turbo Sampler: cancel, progress bar and latent previews, through ComfyUI's own
``latent_preview`` machinery, as its KSampler does them.

ComfyUI's KSampler previews each step's prediction of the clean latents (``x0``, "denoised") in model space
(``process_in``: ``(z - 0.1159) * 0.3611``), with the model's latent format; Z-Image's is ``comfy.latent_formats.Flux``
(Latent2RGB factors for the Flux VAE, TAESD decoder ``taef1_decoder``). The previewer is whatever the user chose with
``--preview-method`` (and, in newer ComfyUI, the per-run override that rewrites the same setting): ``none`` gives no
previewer and no preview work at all; ``auto``/``latent2rgb`` a small RGB image at the latent's size; ``taesd`` the
TAESD decode from ``models/vae_approx`` (Latent2RGB when the file is missing). ``latent_preview.get_previewer`` and
``decode_latent_to_preview_image`` have the same signatures in ComfyUI 0.3.75 and 0.33.0. Only the first image of a
batch is previewed (ComfyUI's rule).

ComfyUI's modules are imported when a callback is made, so importing this file needs no ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable

PREVIEW_FORMAT = "JPEG"  # what ComfyUI's own prepare_callback sends


def make_step_callback(steps: int, device=None) -> Callable:
    """A callback for the core's sampling loop: ``callback(info)`` after each step.

    ``info`` carries ``step`` (0-based), ``total``, ``sigma``, ``latents`` and ``denoised`` (float32
    ``[B, 16, h, w]``, model space). Each call raises ComfyUI's ``InterruptProcessingException`` when the user
    cancelled, then moves ComfyUI's progress bar to ``step + 1`` of ``total`` with a preview of ``denoised`` (of
    ``latents`` if a loop gives no ``denoised``) when previews are on. ``device`` is where a TAESD previewer runs
    (ComfyUI's torch device when None).
    """
    import comfy.latent_formats
    import comfy.model_management
    import comfy.utils
    import latent_preview

    if device is None:
        device = comfy.model_management.get_torch_device()
    previewer = latent_preview.get_previewer(device, comfy.latent_formats.Flux())  # None for --preview-method none
    bar = comfy.utils.ProgressBar(steps)

    def on_step(info) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview = None
        if previewer is not None:
            x0 = getattr(info, "denoised", None)
            if x0 is None:
                x0 = info.latents
            preview = previewer.decode_latent_to_preview_image(PREVIEW_FORMAT, x0)
        bar.update_absolute(info.step + 1, info.total, preview)

    return on_step
