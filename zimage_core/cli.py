"""Command line: ``python -m zimage_core generate ...`` and ``python -m zimage_core demo``."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from .errors import GenerationCancelled, ZImageError, restore_interrupt
from .inputs import (check_batch_size, check_denoise, check_device, check_guidance, check_init_image,
                     check_model_dir, check_output_paths, check_prompts, check_seed, check_size, check_steps,
                     check_tile_args, image_paths)
from .safetensors_io import check_regular_file
from .options import GUARD_POLICIES, MAX_BATCH, MAX_TILE_SIZE, MIN_TILE_SIZE
from .samplers import SAMPLERS

log = logging.getLogger("zimage_core")


def _common(p: argparse.ArgumentParser, *, width: int, height: int) -> None:
    p.add_argument("--prompt", default="a red fox in fresh snow, morning light")
    p.add_argument("--negative-prompt", default="", help="used only with --guidance > 0")
    p.add_argument("--seed", type=int, default=0, help="same meaning as ComfyUI's KSampler seed")
    p.add_argument("--steps", type=int, default=8, help="1..100; Turbo is made for 8")
    p.add_argument("--width", type=int, default=width, help="multiple of 16, 64..8192")
    p.add_argument("--height", type=int, default=height, help="multiple of 16, 64..8192")
    p.add_argument("--batch-size", type=int, default=1, help=f"1..{MAX_BATCH} images")
    p.add_argument("--guidance", type=float, default=0.0, help="diffusers convention (ComfyUI cfg - 1); 0 = off")
    p.add_argument("--denoise", type=float, default=1.0, help="with --init-image: strength in (0, 1]")
    p.add_argument("--init-image", type=Path, help="image for img2img (size must equal width x height)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: best available)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto|bf16|fp16|fp32")
    p.add_argument("--storage", default=None, help="weight storage dtype: bf16|fp16|fp32|fp8 (default: = dtype)")
    p.add_argument("--precision-guard", default=None, choices=list(GUARD_POLICIES),
                   help="fp16 overflow handling (default: auto with fp16 compute, else off)")
    p.add_argument("--tiled-decode", action="store_true", help="decode in exact tiles (bounded memory)")
    p.add_argument("--tile-size", type=int, default=512, help=f"tile size in pixels, {MIN_TILE_SIZE}..{MAX_TILE_SIZE}")
    p.add_argument("--tile-overlap", type=int, default=64, help="tile overlap in pixels")
    p.add_argument("--out", type=Path, default=Path("zimage.png"), help="image to write, .png/.jpg/.webp (batch: name_1.png, ...)")
    p.add_argument("--latents-out", type=Path, help="write final model-space latents (key 'latents', float32)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="merge a LoRA (repeat to stack; strength 1 by default, e.g. style.safetensors:0.8)")
    p.add_argument("--sampler", default="euler", choices=list(SAMPLERS),
                   help="euler (the diffusers reference) or res_multistep (ComfyUI's Z-Image template)")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m zimage_core", description="Z-Image-Turbo, exactly and fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image with real weights")
    gen.add_argument("--model", type=Path, help="diffusers folder (Tongyi-MAI/Z-Image-Turbo layout)")
    gen.add_argument("--transformer", type=Path, help="split file, e.g. z_image_turbo_bf16.safetensors")
    gen.add_argument("--text-encoder", type=Path, help="split file, e.g. qwen_3_4b.safetensors")
    gen.add_argument("--vae", type=Path, help="split file, e.g. ae.safetensors")
    gen.add_argument("--tokenizer", type=Path, help="folder with the Qwen tokenizer (default: model's or ComfyUI's)")
    _common(gen, width=1024, height=1024)
    demo = sub.add_parser("demo", help="build a tiny random-weight model and run the whole path on the CPU")
    demo.add_argument("--model-dir", type=Path, help="where to build/cache the tiny model")
    _common(demo, width=256, height=256)
    demo.set_defaults(out=Path("zimage_demo.png"), device="cpu")
    return parser


def _load_image(path: Path):
    """An init image file as float32 [1, H, W, 3] in 0..1; a missing, empty or non-image file is named."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    check_regular_file(path, "--init-image", "give an image file (PNG, JPEG, WebP, ...)")
    if path.stat().st_size == 0:
        raise ZImageError(f"--init-image {path} is an empty file: it is not an image.")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ZImageError(f"--init-image {path} is not an image PIL can read (PNG, JPEG, WebP, ...).") from None
    except PermissionError:
        raise ZImageError(f"--init-image {path} cannot be read (permission denied).") from None
    except OSError as err:
        raise ZImageError(f"--init-image {path} is damaged or truncated ({err}).") from None
    return torch.from_numpy(array)[None]


def save_png(images, out: Path) -> list[Path]:
    """Write a batch as images (``out``, or ``name_1.png``, ``name_2.png``, ...); the format follows the suffix."""
    import numpy as np
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = image_paths(out, len(images))
    for image, path in zip(images, paths):
        try:
            Image.fromarray((image.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)).save(path)
        except OSError as err:
            raise ZImageError(f"--out {path} cannot be written: {err.strerror or err}.") from None
    return paths


def parse_loras(values: list[str]) -> list[tuple[Path, float]]:
    """``--lora FILE[:STRENGTH]`` values as (file, strength); the file must exist, the strength be a number."""
    out = []
    for value in values:
        path, strength = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head and not Path(value).exists():
            try:
                path, strength = head, float(tail)
            except ValueError:
                raise ZImageError(f"--lora {value!r}: the strength after ':' must be a number (e.g. "
                                  f"{head}:0.8).") from None
        check_regular_file(path, "--lora", "give a LoRA .safetensors file, optionally with :STRENGTH")
        if not math.isfinite(strength) or abs(strength) > 100:
            raise ZImageError(f"--lora {value!r}: strength {strength!r} is out of range: use -100..100 (1 = as trained).")
        out.append((Path(path), strength))
    return out


def input_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """``(option, path)`` of everything the run reads: no output may be one of these files."""
    if args.command == "demo":
        from .tiny import TINY_VERSION, cache_root

        models = [("--model-dir", args.model_dir or cache_root() / f"tiny-{TINY_VERSION}")]
    else:
        models = [(f"--{name.replace('_', '-')}", getattr(args, name))
                  for name in ("model", "transformer", "text_encoder", "vae", "tokenizer")]
    return models + [("--lora", path) for path, _ in args.loras] + [("--init-image", args.init_image)]


def check_args(args: argparse.Namespace):
    """Everything that can be checked without a model, before any model loads: returns the init image."""
    check_prompts(args.prompt, "--prompt")
    check_prompts(args.negative_prompt, "--negative-prompt")
    check_seed(args.seed)
    check_steps(args.steps)
    check_size(args.width, args.height)
    check_batch_size(args.batch_size)
    check_guidance(args.guidance)
    check_denoise(args.denoise, has_init=args.init_image is not None, steps=args.steps)
    check_tile_args(args.tile_size, args.tile_overlap)
    if args.command == "demo":
        check_model_dir(args.model_dir, "--model-dir")
    args.loras = parse_loras(args.lora)
    check_output_paths(args.out, args.latents_out, args.batch_size, inputs=input_paths(args))
    check_device(args.device)
    init_image = _load_image(args.init_image) if args.init_image else None
    if init_image is not None:
        check_init_image(init_image, batch=args.batch_size, width=args.width, height=args.height)
    return init_image


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import ZImage

    init_image = check_args(args)
    if args.command == "demo":
        from .tiny import tiny_model_dir

        model_dir = tiny_model_dir(args.model_dir)
        zimage = ZImage.load(model_dir, device=args.device, dtype=args.dtype, storage=args.storage)
    else:
        zimage = ZImage.load(args.model, transformer=args.transformer, text_encoder=args.text_encoder, vae=args.vae,
                             tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, storage=args.storage)
    log.info("dtypes: %s on %s", zimage.policy.describe(), zimage.device)
    zimage.set_loras(args.loras)
    zimage.set_precision_guard(args.precision_guard)  # None: auto with fp16 compute, off otherwise
    bar = tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr, disable=None)
    start = time.perf_counter()
    try:
        result = zimage.generate(
            args.prompt, seed=args.seed, steps=args.steps, width=args.width, height=args.height,
            batch_size=args.batch_size, guidance=args.guidance, negative_prompt=args.negative_prompt,
            denoise=args.denoise, init_image=init_image, callback=lambda info: bar.update(1),
            tiled_decode=True if args.tiled_decode else "auto", tile_size=args.tile_size,
            tile_overlap=args.tile_overlap, sampler=args.sampler,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    for path in save_png(result.images, args.out):
        print(f"wrote {path} ({args.width}x{args.height}, seed {args.seed}, {args.steps} steps, {seconds:.2f} s)")
    if args.latents_out:
        from safetensors.torch import save_file

        args.latents_out.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_file({"latents": result.latents.float().contiguous()}, str(args.latents_out))
        except OSError as err:
            raise ZImageError(f"--latents-out {args.latents_out} cannot be written: {err.strerror or err}.") from None
        print(f"wrote {args.latents_out}")
    if result.report.get("events"):
        print("precision guard:", result.report["summary"])
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ``error: ...`` (exit 2) like every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    restore_interrupt()  # the imports are done: Ctrl-C is a KeyboardInterrupt, handled below
    try:
        return run(args)
    except ZImageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except GenerationCancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cancelled: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: still one line, the traceback with -v
        if args.verbose:
            raise
        print(f"error: internal error {type(err).__name__}: {_one_line(err)} (run with -v for the traceback and "
              "please report it)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
