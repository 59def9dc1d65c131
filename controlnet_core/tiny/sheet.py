"""A labelled grid of images (PNG): the demo's contact sheet and the training run's sample strips.

Text is drawn with Pillow's scalable default font (`ImageFont.load_default(size=...)`, FreeType),
sized to the tiles: labels and captions at 1/14 of a tile's width, the title a little larger and
shrunk until it fits the sheet. PIL's old fixed bitmap font was ~11 px tall whatever the tile
size, so on a 2000 px sheet words ran together ("nocontrol"). Without FreeType, Pillow falls back
to that bitmap font and the sheet is still written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

Box = tuple[int, int, int, int]  # x, y, width, height of a tile in the sheet
LABEL_FRACTION = 14  # label and caption font size = tile width / this


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=max(8, int(size)))


def _fitting_font(draw, text: str, size: int, width: int):
    """The largest font of at most `size` px in which `text` fits `width` pixels (down to 8 px)."""
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > width:
        size -= 1
        font = _font(size)
    return font


def contact_sheet(columns: list[tuple[str, np.ndarray, list[str] | None]], path: str | Path, title: str = "",
                  scale: int = 2) -> dict[str, list[Box]]:
    """Labelled columns of images: (label, uint8 (rows, H, W, 3), optional caption per row).

    Writes the PNG and returns where each column's tiles are (label -> one box per row), so a caller
    (or a test) can find an image on the sheet.
    """
    from PIL import Image, ImageDraw

    rows = max(c[1].shape[0] for c in columns)
    h, w = columns[0][1].shape[1] * scale, columns[0][1].shape[2] * scale
    size = max(8, w // LABEL_FRACTION)
    gap = max(6, size // 3)
    label_h = size + gap // 2 + 2
    title_h = (round(1.2 * size) + gap) if title else 0
    head = gap + title_h + label_h
    cap = size + gap // 2 + 2 if any(c[2] for c in columns) else 0
    sheet = Image.new("RGB", (len(columns) * (w + gap) + gap, head + rows * (h + cap + gap)), "white")
    d = ImageDraw.Draw(sheet)
    if title:
        d.text((gap, gap), title, fill="black", font=_fitting_font(d, title, round(1.2 * size), sheet.width - 2 * gap))
    boxes: dict[str, list[Box]] = {}
    for c, (label, imgs, captions) in enumerate(columns):
        x = gap + c * (w + gap)
        d.text((x, gap + title_h), label, fill="black", font=_fitting_font(d, label, size, w))
        boxes[label] = []
        for r in range(rows):
            im = imgs[min(r, imgs.shape[0] - 1)]
            y = head + r * (h + cap + gap)
            sheet.paste(Image.fromarray(im).resize((w, h), Image.Resampling.LANCZOS), (x, y))
            boxes[label].append((x, y, w, h))
            if captions:
                d.text((x, y + h + 2), captions[r], fill=(60, 60, 60), font=_fitting_font(d, captions[r], size, w))
    sheet.save(path)
    return boxes
