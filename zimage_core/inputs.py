"""Every check of a user's input, in one place: the API (``ZImage.generate``), the CLI and the nodes call these.

Each check raises ``ZImageError`` naming the input, what it got, the allowed values and the fix, before any
model loads or any work starts, so an hour of sampling is never lost to a typo. Types are checked strictly:
``True`` is not a seed, ``'2'`` is not a batch size, NaN is not a guidance.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
import tempfile
from pathlib import Path

from .errors import ZImageError
from .options import MAX_BATCH, MAX_TILE_SIZE, MIN_TILE_SIZE, TILE_SIZE_STEP

MAX_SEED = 2**64 - 1
MAX_GUIDANCE = 100.0  # far above any useful value; inf or 1e30 overflow the prediction to NaN
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LATENT_SUFFIXES = (".safetensors",)


# ------------------------------------------------------------------------------------------- plain values
def _type(value) -> str:
    return type(value).__name__


def is_int(value) -> bool:
    """A whole number that is not a bool (``True`` is an ``int`` to Python, not a count to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, low: int, high: int, hint: str = "") -> int:
    if not is_int(value):
        raise ZImageError(f"{name} must be a whole number in {low}..{high}, got {value!r} ({_type(value)}){hint}.")
    if not low <= value <= high:
        raise ZImageError(f"{name} {value} is out of range: use {low}..{high}{hint}.")
    return int(value)


def check_real(name: str, value, low: float, high: float, *, low_open: bool = False, hint: str = "") -> float:
    rng = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if not is_real(value):
        raise ZImageError(f"{name} must be a number in {rng}, got {value!r} ({_type(value)}){hint}.")
    value = float(value)
    if not math.isfinite(value):
        raise ZImageError(f"{name} {value} is not a finite number: use a value in {rng}{hint}.")
    if value < low or value > high or (low_open and value == low):
        raise ZImageError(f"{name} {value:g} is out of range: use a value in {rng}{hint}.")
    return value


def check_seed(seed) -> int:
    return check_int("seed", seed, 0, MAX_SEED)


def check_batch_size(batch_size) -> int:
    return check_int("batch_size", batch_size, 1, MAX_BATCH,
                     f" (more images: run again with other seeds; the node has the same limit)")


def check_guidance(guidance) -> float:
    return check_real("guidance", guidance, 0.0, MAX_GUIDANCE,
                      hint=" (diffusers convention, ComfyUI cfg - 1; 0 = off, as Turbo wants)")


def check_denoise(denoise, has_init: bool = True, steps=None) -> float:
    """``denoise`` in (0, 1], a finite number; below 1 only with an init image or latent (img2img), as the
    ComfyUI node. With ``steps`` the schedule's floor applies too (``schedules.schedule_length``: the
    ``int(steps / denoise)`` schedule stays bounded; 1e-9 once asked for 8 GB)."""
    denoise = check_real("denoise", denoise, 0.0, 1.0, low_open=True,
                         hint=" (1 starts from pure noise; lower keeps more of the init image)")
    if denoise < 1.0 and not has_init:
        raise ZImageError(
            f"denoise {denoise:g} needs an init image or latent (img2img): without one, part of the schedule "
            "would be skipped from pure noise and give a blurry, unfinished image. Use denoise 1, or pass an init image."
        )
    if steps is not None:
        from .schedules import schedule_length  # the sampler's own floor, one rule for every entry point

        schedule_length(steps, denoise)
    return denoise


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A string or a non-empty list of strings, each encodable as UTF-8 (no lone surrogates)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ZImageError(f"{name} must be text or a non-empty list of texts, got {prompt!r} ({_type(prompt)}).")
    for i, text in enumerate(prompts):
        where = name if isinstance(prompt, str) else f"{name}[{i}]"
        if not isinstance(text, str):
            raise ZImageError(f"{where} must be text, got {text!r} ({_type(text)}).")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ZImageError(
                f"{where} is not valid Unicode text: character {err.start} is a lone surrogate "
                f"{text[err.start]!r} (a broken emoji or a bad decode). Remove it or fix the text's encoding."
            ) from None
    return list(prompts)


def check_tile_args(tile_size, overlap) -> tuple[int, int]:
    """The tiled VAE decode's tile side and overlap in output pixels: the one tile rule (ranges in options.py)."""
    rule = (f"use a multiple of {TILE_SIZE_STEP}, at least {MIN_TILE_SIZE} and at most {MAX_TILE_SIZE} output pixels "
            "(512 is usual)")
    if not is_int(tile_size):
        raise ZImageError(f"tile_size must be a whole number, got {tile_size!r} ({_type(tile_size)}): {rule}.")
    if tile_size % TILE_SIZE_STEP or not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE:
        lower = min(max(MIN_TILE_SIZE, tile_size // TILE_SIZE_STEP * TILE_SIZE_STEP), MAX_TILE_SIZE)
        near = (f"; the nearest allowed are {lower} and {lower + TILE_SIZE_STEP}"
                if MIN_TILE_SIZE < tile_size < MAX_TILE_SIZE else "")
        raise ZImageError(f"tile_size {tile_size} is not allowed: {rule}{near}.")
    if not is_int(overlap) or not 0 <= overlap < tile_size:
        raise ZImageError(f"tile_overlap {overlap!r} is out of range: use a whole number from 0 to {tile_size - 1} "
                          "output pixels, below the tile size (tiles are exact without overlap, so 0 is the fastest).")
    return int(tile_size), int(overlap)


def check_tiled(tiled) -> bool | str:
    if tiled is True or tiled is False or tiled == "auto":
        return tiled
    raise ZImageError(f"tiled_decode must be True, False or 'auto', got {tiled!r}.")


def check_size(width, height) -> None:
    from .sampler import check_size as size  # the sampler owns the size rule; imported here lazily

    size(width, height)


def check_steps(steps) -> None:
    from .sampler import check_steps as steps_rule

    steps_rule(steps)


# ------------------------------------------------------------------------------------------ init images
def check_init_image(image, *, batch: int, width: int, height: int):
    """A float ``torch.Tensor`` ``[B, H, W, 3]`` in 0..1, B 1 or the batch, H x W the asked size."""
    import torch

    if image is None:
        return None
    if not isinstance(image, torch.Tensor):
        hint = (" (a numpy array: pass torch.from_numpy(array), scaled to 0..1)" if type(image).__module__ == "numpy"
                else " (load it with PIL and convert, or use the CLI's --init-image)")
        raise ZImageError(f"init_image must be a torch.Tensor [B, H, W, 3] in 0..1, got {_type(image)}{hint}.")
    if image.ndim == 3 and image.shape[-1] == 3:
        raise ZImageError(f"init_image has shape {list(image.shape)}: add the batch dimension, image[None] "
                          "([1, H, W, 3]).")
    if image.ndim != 4 or image.shape[-1] != 3:
        hint = (" It looks channels-first: use image.permute(0, 2, 3, 1)." if image.ndim == 4 and image.shape[1] == 3
                else " Drop the alpha channel: image[..., :3]." if image.ndim == 4 and image.shape[-1] == 4 else "")
        raise ZImageError(f"init_image has shape {list(image.shape)}; the layout is [B, H, W, 3] (ComfyUI's "
                          f"IMAGE).{hint}")
    if not image.is_floating_point():
        raise ZImageError(f"init_image is {str(image.dtype).replace('torch.', '')} (0..255 pixels?); it must be a "
                          "float tensor in 0..1: pass image.float() / 255.")
    if image.shape[0] not in (1, batch):
        raise ZImageError(f"init_image holds {image.shape[0]} images; use 1 (shared) or {batch} (one per image).")
    if tuple(image.shape[1:3]) != (height, width):
        raise ZImageError(f"the init image is {image.shape[2]}x{image.shape[1]} but {width}x{height} was asked "
                          "for: resize the image or change width/height.")
    if not bool(torch.isfinite(image).all()):
        raise ZImageError("init_image holds NaN or Inf values; it must be a float image in 0..1.")
    low, high = float(image.min()), float(image.max())
    if high > 1.0 + 1e-3:
        raise ZImageError(f"init_image values reach {high:g}; they must be in 0..1 "
                          + ("(this looks like 0..255 pixels: divide by 255)." if high <= 255.5 else "."))
    if low < -1e-3:
        raise ZImageError(f"init_image values go down to {low:g}; they must be in 0..1 "
                          + ("(this looks like -1..1: use (image + 1) / 2)." if low >= -1.001 else "."))
    return image.float().clamp(0, 1)


# ----------------------------------------------------------------------------------------- the API call
def check_generate_args(prompt, *, seed, steps, width, height, batch_size, guidance, negative_prompt, denoise,
                        init_image, decode=True, tiled_decode="auto", tile_size=512, tile_overlap=64):
    """All of ``ZImage.generate``'s inputs, before any work. Returns ``(prompts, negatives, init_image)``:
    the prompts repeated per image, the negatives (None without guidance) and the checked init image."""
    prompts = check_prompts(prompt)
    check_seed(seed)
    check_steps(steps)
    check_size(width, height)
    batch_size = check_batch_size(batch_size)
    guidance = check_guidance(guidance)
    check_denoise(denoise, has_init=init_image is not None, steps=steps)
    if not isinstance(decode, bool):
        raise ZImageError(f"decode must be True or False, got {decode!r}.")
    check_tiled(tiled_decode)
    check_tile_args(tile_size, tile_overlap)
    prompts = [p for p in prompts for _ in range(batch_size)]
    if len(prompts) > MAX_BATCH:
        raise ZImageError(f"{len(prompts)} images asked for (prompts x batch_size); at most {MAX_BATCH} per call.")
    negatives = None
    if guidance > 0:
        if negative_prompt is None:
            raise ZImageError("negative_prompt must be text with guidance > 0, got None: use '' (the usual empty "
                              "negative) or set guidance 0.")
        negatives = check_prompts(negative_prompt, "negative_prompt")
        distinct = len(prompts) // batch_size
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) == distinct:
            negatives = [n for n in negatives for _ in range(batch_size)]
        else:
            raise ZImageError(f"{len(negatives)} negative prompts for {distinct} prompts: give one negative, or one "
                              "per prompt.")
    image = check_init_image(init_image, batch=len(prompts), width=width, height=height)
    return prompts, negatives, image


# ------------------------------------------------------------------------------------------ devices
def check_device(device):
    """``None`` (best available), or a torch device string/object this machine has."""
    import torch

    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ZImageError(f"device must be a name like 'cuda', 'cuda:1', 'mps' or 'cpu', got {device!r}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ZImageError(f"device {device!r} is not a device name: use cuda, cuda:N, mps or cpu.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ZImageError(f"device {device!r} asked for, but this machine has no usable CUDA GPU (no NVIDIA "
                              "driver, or torch built without CUDA). Use --device cpu, or leave it out.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ZImageError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered 0..{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ZImageError(f"device {device!r} asked for, but MPS (Apple GPU) is not available here. Use cpu.")
    elif dev.type != "cpu":
        raise ZImageError(f"device {device!r} is not supported: use cuda, cuda:N, mps or cpu.")
    return dev


# ------------------------------------------------------------------------------------------ files
def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; a corrupt or unreadable file is named in the error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ZImageError(f"{path} cannot be read (permission denied): give this user read access.") from None
    except UnicodeDecodeError:
        raise ZImageError(f"{path} is not UTF-8 JSON text: the file is damaged; download it again.") from None
    except OSError as err:
        raise ZImageError(f"{path} cannot be read: {err.strerror or err}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ZImageError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): the file "
                          "is damaged or cut short; download it again.") from None
    if not isinstance(data, dict):
        raise ZImageError(f"{path} holds a JSON {_type(data)}, not an object: it is not a config file.")
    return data


IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; WebP: RIFF....WEBP
MAX_INPUT_DEPTH = 3  # folder levels searched for input files: a diffusers folder's files sit 2 levels down


def _name_max(folder: Path) -> int:
    """The longest file name the folder's file system takes, in bytes (255 on ext4, XFS, btrfs, APFS, NTFS)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _check_name_length(path: Path, what: str) -> None:
    """Every part of ``path`` within the file system's name limit, before anything stats it (an over-long name
    makes ``exists()`` raise instead of answering)."""
    limit = _name_max(Path(os.path.abspath(path)).parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-12:]
            raise ZImageError(f"{what} {shown!r}: the name is {size} bytes long; file names can be at most {limit} "
                              "bytes here. Choose a shorter name.")


def _check_writable(path: Path, what: str, suffixes: tuple[str, ...]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ZImageError(f"{what} must be a file path, got {path!r}.")
    path = Path(path)
    _check_name_length(path, what)
    if path.is_dir():
        raise ZImageError(f"{what} {path} is a folder: give a file name, e.g. {path / ('image' + suffixes[0])}.")
    if path.suffix.lower() not in suffixes:
        raise ZImageError(f"{what} {path} has {'no extension' if not path.suffix else 'extension ' + path.suffix}: "
                          f"use {' or '.join(suffixes)} (e.g. {path.with_suffix(suffixes[0])}).")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ZImageError(f"{what} {path}: {existing} is a file, so the folder {folder} cannot be made.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".zimage-write-test-"):
            pass  # a real write: os.access says yes to root on a read-only mount
    except OSError as err:
        raise ZImageError(f"{what} {path}: the folder {folder} is not writable ({err.strerror or err}); choose "
                          "another folder.") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ZImageError(f"{what} {path} exists and is read-only: remove it or choose another name.")
    return path


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode for an existing file (symlinks followed, hard links
    equal), else the resolved path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(Path(os.path.abspath(path)).resolve()))


def input_files(option: str, path) -> list[tuple[str, Path]]:
    """``(option, file)`` for an input path: the file itself, or the files a loader may read in a folder: of a
    diffusers folder (``model_index.json``) that file and everything in its subfolders, of any other folder every
    file, down to ``MAX_INPUT_DEPTH`` levels; images never (no loader reads them from a folder, and a rerun may
    replace its own earlier image there). Costs one ``stat`` per entry of those folders."""
    path = Path(path)
    if not path.is_dir():
        return [(option, path)]
    diffusers = (path / "model_index.json").is_file()
    out = []
    base = len(path.parts)
    for root, dirs, files in os.walk(path, followlinks=True):
        depth = len(Path(root).parts) - base
        if depth + 1 >= MAX_INPUT_DEPTH:
            dirs[:] = []
        if diffusers and depth == 0:
            files = [f for f in files if f == "model_index.json"]
        out.extend((option, Path(root) / f) for f in files if Path(f).suffix.lower() not in IMAGE_SUFFIXES)
    return out


def _is_image_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(12)
    return not head or head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _is_latents_file(path: Path) -> bool:
    from .safetensors_io import SafetensorsFile

    if path.stat().st_size == 0:
        return True
    try:
        return SafetensorsFile(path).keys() == ["latents"]  # reads the header only
    except ZImageError:
        return False


def _check_replaceable(path: Path, what: str, ours, kind: str) -> None:
    """An existing output may only be one of ours (an image; a latents file) or empty: anything else would be lost."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # not there: nothing to lose
    if not stat.S_ISREG(mode):
        raise ZImageError(f"{what} {path} exists and is not a regular file (a FIFO, device or socket): choose "
                          "another name.")
    try:
        fine = ours(path)
    except OSError as err:
        raise ZImageError(f"{what} {path} exists and cannot be read ({err.strerror or err}): choose another name.") \
            from None
    if not fine:
        raise ZImageError(f"{what} {path} exists and is not {kind}, so writing would destroy it: remove it yourself "
                          "if it is not needed, or choose another name.")


def check_output_paths(out, latents_out=None, batch: int = 1, inputs=()) -> tuple[Path, Path | None]:
    """The CLI's outputs, checked before any model loads: writable files with the right extension and a name the
    file system takes; none of them the same file as an input (``inputs``: ``(option, path)`` pairs, folders
    searched by ``input_files``) or as another output, compared by device and inode (hard links and symlinks
    included) or, for files not there yet, by resolved path; an existing output file only an image (``--out``)
    or a latents file (``--latents-out``) written before, or empty. Costs a ``stat`` per input file and reads
    the first bytes (the header) of an existing output."""
    out = _check_writable(out, "--out", IMAGE_SUFFIXES)
    outputs = [("--out", p) for p in image_paths(out, batch)]
    for _, p in outputs:
        _check_name_length(p, "--out")
    if latents_out is not None:
        latents_out = _check_writable(latents_out, "--latents-out", LATENT_SUFFIXES)
        outputs.append(("--latents-out", latents_out))
    seen: dict[tuple, tuple[str, Path]] = {}
    for option, p in outputs:
        key = _identity(p)
        if key in seen:
            other, first = seen[key]
            raise ZImageError(f"{option} {p} is the same file as {other} {first}: give each output its own name, "
                              "e.g. image.png and latents.safetensors.")
        seen[key] = (option, p)
    files = [pair for option, path in inputs if path is not None for pair in input_files(option, path)]
    for option, path in files:
        hit = seen.get(_identity(path))
        if hit is not None:
            out_option, out_path = hit
            same = "" if str(out_path) == str(path) else f" ({path}, resolved or hard-linked)"
            raise ZImageError(f"{out_option} {out_path} is the input file of {option}{same}: writing there would "
                              f"overwrite it. Choose another {out_option} name, e.g. "
                              f"{out_path.with_name('zimage_out' + out_path.suffix)}.")
    for option, p in outputs:
        if option == "--out":
            _check_replaceable(p, option, _is_image_file, "an image (PNG, JPEG or WebP)")
        else:
            _check_replaceable(p, option, _is_latents_file, "a latents file (a .safetensors holding only 'latents')")
    return out, latents_out


def check_model_dir(path, what: str = "model_dir") -> Path | None:
    """A folder to build or read a model in: ``None`` (the default place), a folder holding the model
    (``model_index.json``), an empty folder, or a path whose existing part is a folder (the rest is made). A file
    there, or a folder of other files, is refused before anything is written."""
    if path is None:
        return None
    path = Path(path)
    _check_name_length(path, what)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise ZImageError(f"{what} {path} {where}, not a folder: give a folder (it is made if missing), or leave "
                          f"{what} out to use the default cache.")
    if existing == path and not (path / "model_index.json").is_file() and any(path.iterdir()):
        raise ZImageError(f"{what} {path} is a folder with other files and no model (no model_index.json): the model "
                          f"is built in a new or empty folder; give one, or leave {what} out to use the default cache.")
    return path


def image_paths(out: Path, count: int) -> list[Path]:
    """Where a batch's images go: ``out`` for one, ``name_1.png``, ``name_2.png``, ... for more."""
    out = Path(out)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(count)]


def out_of_memory_error(err: BaseException, images: int, width: int, height: int, device) -> ZImageError:
    """The allocator's failure as an estimate and the fixes (smaller batch, offload, tiling)."""
    import re

    import torch

    asked = re.search(r"Tried to allocate ([\d.]+ [GMK]iB)", str(err))
    where = str(device)
    free = ""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        available, total = torch.cuda.mem_get_info(torch.device(device))
        free = f" ({available / 2**30:.1f} of {total / 2**30:.1f} GiB free now)"
    smaller = max(1, images // 2)
    return ZImageError(
        f"{images} image(s) of {width}x{height} do not fit in {where} memory{free}"
        + (f": one more allocation of {asked.group(1)} failed" if asked else "")
        + f". Memory grows with the batch and the pixel count: use a smaller batch (e.g. {smaller}), offload "
        "('model' or 'sequential'), tiled VAE decode, or a smaller size."
    )
