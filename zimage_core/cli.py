"""Command line: ``python -m zimage_core generate ...`` and ``python -m zimage_core demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import GenerationCancelled, ZImageError

log = logging.getLogger("zimage_core")


def _common(p: argparse.ArgumentParser, *, width: int, height: int) -> None:
    p.add_argument("--prompt", default="a red fox in fresh snow, morning light")
    p.add_argument("--negative-prompt", default="", help="used only with --guidance > 0")
    p.add_argument("--seed", type=int, default=0, help="same meaning as ComfyUI's KSampler seed")
    p.add_argument("--steps", type=int, default=8, help="1..100; Turbo is made for 8")
    p.add_argument("--width", type=int, default=width, help="multiple of 16, 64..8192")
    p.add_argument("--height", type=int, default=height, help="multiple of 16, 64..8192")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--guidance", type=float, default=0.0, help="diffusers convention (ComfyUI cfg - 1); 0 = off")
    p.add_argument("--denoise", type=float, default=1.0, help="with --init-image: strength in (0, 1]")
    p.add_argument("--init-image", type=Path, help="image for img2img (size must equal width x height)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: best available)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto|bf16|fp16|fp32")
    p.add_argument("--storage", default=None, help="weight storage dtype: bf16|fp16|fp32|fp8 (default: = dtype)")
    p.add_argument("--precision-guard", default=None, choices=["off", "detect", "auto", "clamp"],
                   help="fp16 overflow handling (default: auto with fp16 compute, else off)")
    p.add_argument("--tiled-decode", action="store_true", help="decode in exact tiles (bounded memory)")
    p.add_argument("--tile-size", type=int, default=512, help="tile size in pixels, 64..4096")
    p.add_argument("--tile-overlap", type=int, default=64, help="tile overlap in pixels")
    p.add_argument("--out", type=Path, default=Path("zimage.png"), help="PNG to write (batch: name_1.png, ...)")
    p.add_argument("--latents-out", type=Path, help="write final model-space latents (key 'latents', float32)")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zimage_core", description="Z-Image-Turbo, exactly and fast.")
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
    import numpy as np
    import torch
    from PIL import Image

    if not path.is_file():
        raise ZImageError(f"init image not found: {path}.")
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def save_png(images, out: Path) -> list[Path]:
    import numpy as np
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        Image.fromarray((image.numpy() * 255.0).round().clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import ZImage

    if args.command == "demo":
        from .tiny import tiny_model_dir

        model_dir = tiny_model_dir(args.model_dir)
        zimage = ZImage.load(model_dir, device=args.device, dtype=args.dtype, storage=args.storage)
    else:
        zimage = ZImage.load(args.model, transformer=args.transformer, text_encoder=args.text_encoder, vae=args.vae,
                             tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, storage=args.storage)
    log.info("dtypes: %s on %s", zimage.policy.describe(), zimage.device)
    zimage.set_precision_guard(args.precision_guard)  # None: auto with fp16 compute, off otherwise
    init_image = _load_image(args.init_image) if args.init_image else None
    bar = tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr, disable=None)
    start = time.perf_counter()
    result = zimage.generate(
        args.prompt, seed=args.seed, steps=args.steps, width=args.width, height=args.height,
        batch_size=args.batch_size, guidance=args.guidance, negative_prompt=args.negative_prompt,
        denoise=args.denoise, init_image=init_image, callback=lambda info: bar.update(1),
        tiled_decode=True if args.tiled_decode else "auto", tile_size=args.tile_size, tile_overlap=args.tile_overlap,
    )
    bar.close()
    seconds = time.perf_counter() - start
    for path in save_png(result.images, args.out):
        print(f"wrote {path} ({args.width}x{args.height}, seed {args.seed}, {args.steps} steps, {seconds:.2f} s)")
    if args.latents_out:
        from safetensors.torch import save_file

        args.latents_out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": result.latents.float().contiguous()}, str(args.latents_out))
        print(f"wrote {args.latents_out}")
    if result.report.get("events"):
        print("precision guard:", result.report["summary"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return run(args)
    except ZImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except GenerationCancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
