"""A labelled grid of images (PNG): the demo's contact sheet and the training run's sample strips."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def contact_sheet(columns: list[tuple[str, np.ndarray, list[str] | None]], path: str | Path, title: str = "",
                  scale: int = 2) -> None:
    """Labelled columns of images: (label, uint8 (rows, H, W, 3), optional caption per row)."""
    from PIL import Image, ImageDraw

    rows = max(c[1].shape[0] for c in columns)
    h, w = columns[0][1].shape[1] * scale, columns[0][1].shape[2] * scale
    head, cap, gap = 40 if title else 22, 14, 6
    sheet = Image.new("RGB", (len(columns) * (w + gap) + gap, head + rows * (h + cap + gap) + gap), "white")
    d = ImageDraw.Draw(sheet)
    if title:
        d.text((gap, 4), title, fill="black")
    for c, (label, imgs, captions) in enumerate(columns):
        x = gap + c * (w + gap)
        d.text((x + 2, head - 16), label, fill="black")
        for r in range(rows):
            im = imgs[min(r, imgs.shape[0] - 1)]
            y = head + r * (h + cap + gap)
            sheet.paste(Image.fromarray(im).resize((w, h), Image.Resampling.LANCZOS), (x, y))
            if captions:
                d.text((x + 2, y + h + 1), captions[r], fill=(60, 60, 60))
    sheet.save(path)
