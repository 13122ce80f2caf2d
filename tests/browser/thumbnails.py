"""Make the template browser's thumbnails (workflows/<name>.jpg) from a browser-test run:

    .venv/bin/python -m pytest -q tests/test_browser.py --basetemp /tmp/zt-browser
    .venv/bin/python tests/browser/thumbnails.py /tmp/zt-browser/browser0

The template browser shows square cards about 240 px wide, so each thumbnail is square: the pack's name, the
workflow's name in large type, and the graph as the frontend's canvas renderer draws it right after loading
(cropped to the nodes).
"""

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[2]
SIDE = 512
BACKGROUND = (32, 32, 36)
FONTS = Path("/usr/share/fonts/truetype/dejavu")  # Debian's fonts-dejavu-core (scripts/browser-install.sh)


def font(bold: bool, size: int):
    return ImageFont.truetype(str(FONTS / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)


def wrap(draw, text: str, face, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=face) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line]


def thumbnail(name: str, shot: Path, box) -> Image.Image:
    card = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(card)
    y = 56  # below the badge that frontends 1.49 and later put over a card's top left corner
    draw.text((28, y), "Z-Image Turbo", font=font(False, 30), fill=(150, 170, 255))  # the card's title is the name alone
    y += 44
    face = font(True, 50)
    for line in wrap(draw, name, face, SIDE - 56):
        draw.text((28, y), line, font=face, fill=(240, 240, 240))
        y += 60
    with Image.open(shot) as image:
        graph = image.convert("RGB")
    if box:
        x, top, w, h = box
        margin = 12
        graph = graph.crop((int(x - margin), int(top - margin), int(x + w + margin), int(top + h + margin)))
    room_w, room_h = SIDE - 32, SIDE - y - 28
    scale = min(room_w / graph.width, room_h / graph.height)
    graph = graph.resize((round(graph.width * scale), round(graph.height * scale)), Image.LANCZOS)
    card.paste(graph, ((SIDE - graph.width) // 2, y + 12 + (room_h - graph.height) // 2))
    return card


def make(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    written = []
    for name, result in results["modes"]["classic"]["workflows"].items():
        target = REPO / "workflows" / f"{name}.jpg"
        thumbnail(name, Path(result["screenshot"]), result["screen_box"]).save(
            target, quality=85, optimize=True, progressive=True)
        written.append(target)
    return written


if __name__ == "__main__":
    for path in make(Path(sys.argv[1])):
        print(path, path.stat().st_size)
