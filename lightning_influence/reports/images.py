"""Pictures of a report: thumbnails of image inputs, and captioned grids sized for TensorBoard's image cards.

TensorBoard shows an image scaled to its card, about 350-400 px wide, so every grid is GRID_WIDTH = 600 px wide
with text of at least 22 px (≥ 12 px on screen) and a legend drawn into the picture. Colour is never the only
cue: scores carry their sign and suspect labels a badge and a caption line.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

THUMBNAIL_SIDE = 64  # largest side of a saved thumbnail, in pixels
GRID_WIDTH = 600
_MARGIN, _GAP = 16, 12
_PER_ROW = 5
_TILE = (GRID_WIDTH - 2 * _MARGIN - (_PER_ROW - 1) * _GAP) // _PER_ROW  # 104 px
_TEXT, _TITLE = 22, 26  # font sizes in pixels
_LINE = _TEXT + 4

COLOURS = {
    "query": (40, 90, 200),
    "helpful": (26, 140, 70),
    "harmful": (205, 45, 35),
    "self": (110, 110, 110),  # neutral: high self-influence is a question, not a verdict
    "suspect": (230, 150, 0),
    "text": (20, 20, 20),
    "muted": (90, 90, 90),
}


def as_image(value: Any) -> np.ndarray | None:
    """One example's input as an [H, W, 3] float image in [0, 1], or None if it does not look like an image.

    Images are [C, H, W] tensors with 1, 3 or 4 channels, or [H, W] tensors, at least 4 pixels a side.
    """
    if not isinstance(value, Tensor) or not value.is_floating_point() and value.dtype != torch.uint8:
        return None
    image = value.detach().cpu().float()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or min(image.shape[1:]) < 4:
        return None
    image = image[:3]
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def thumbnail_side(value: Any) -> int | None:
    """The side of the square thumbnails for inputs like `value`: its longer side, at most THUMBNAIL_SIDE; None
    when it is not an image."""
    image = as_image(value)
    return None if image is None else min(THUMBNAIL_SIDE, max(image.shape[:2]))


def thumbnail(value: Any, side: int) -> np.ndarray | None:
    """`value` as a [side, side, 3] uint8 picture, scaled to fit and centred on white; None if not an image."""
    from PIL import Image

    image = as_image(value)
    if image is None:
        return None
    picture = Image.fromarray((image * 255).round().astype(np.uint8))
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.BILINEAR if scale < 1 else Image.NEAREST)
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(picture, ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(canvas)


def png(image: np.ndarray) -> bytes:
    """An [H, W, 3] uint8 array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


@dataclass
class Tile:
    """One picture of a grid: the thumbnail, caption lines (the last one in `accent` colour when given), the frame
    colour's name, and whether to badge it as a suspect label."""

    image: np.ndarray
    lines: list[str]
    kind: str
    suspect: bool = False


def _badge(draw: Any, x: int, y: int, size: int = 26) -> None:
    """The suspect-label mark: an amber disc with a black '!' centred at (x, y)."""
    r = size // 2
    draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS["suspect"], outline="black", width=2)
    draw.text((x, y), "!", fill="black", font=_font(_TEXT), anchor="mm")


def _draw_tile(canvas: Any, draw: Any, tile: Tile, left: int, top: int, side: int) -> None:
    from PIL import Image

    picture = Image.fromarray(tile.image).resize((side, side), Image.NEAREST)
    canvas.paste(picture, (left, top))
    draw.rectangle((left - 3, top - 3, left + side + 2, top + side + 2), outline=COLOURS[tile.kind], width=4)
    if tile.suspect:
        _badge(draw, left + side - 4, top + 4)
    for n, line in enumerate(tile.lines):
        accent = tile.suspect and line.startswith("pred")
        draw.text((left, top + side + 6 + n * _LINE), line, font=_font(_TEXT),
                  fill=COLOURS["suspect"] if accent else COLOURS["text"])


def _row_height(tiles: Sequence[Tile]) -> int:
    return _TILE + 10 + max(len(t.lines) for t in tiles) * _LINE


def _legend(draw: Any, left: int, top: int, kinds: Sequence[tuple[str, str]]) -> None:
    """Coloured squares (or the badge, for 'suspect') with their meanings, one per line."""
    for n, (kind, meaning) in enumerate(kinds):
        y = top + n * (_LINE + 4)
        if kind == "suspect":
            _badge(draw, left + 11, y + _TEXT // 2 + 2, size=22)
        else:
            draw.rectangle((left, y + 2, left + 22, y + 24), outline=COLOURS[kind], width=5)
        draw.text((left + 32, y), meaning, font=_font(_TEXT), fill=COLOURS["text"])


@dataclass
class Section:
    """A titled run of tiles; an empty section shows `empty` instead."""

    title: str
    tiles: list[Tile]
    empty: str = ""


def grid(header: Tile | None, title: list[str], legend: list[tuple[str, str]], sections: list[Section]) -> np.ndarray:
    """A GRID_WIDTH-wide picture: an optional large header tile with title lines and the legend beside it, then
    each section's title over rows of up to five tiles. Returns [H, W, 3] uint8."""
    from PIL import Image, ImageDraw

    head_side = 2 * _TILE if header is not None else 0
    text_height = len(title) * (_TITLE + 8) + len(legend) * (_LINE + 4) + 12
    head_height = max(head_side + 12, text_height) + _MARGIN
    rows = [section.tiles[i:i + _PER_ROW] for section in sections for i in range(0, len(section.tiles), _PER_ROW)]
    height = head_height + sum(_TITLE + 14 for _ in sections) + sum(_row_height(r) + 8 for r in rows if r)
    height += sum(_LINE for s in sections if not s.tiles) + _MARGIN
    canvas = Image.new("RGB", (GRID_WIDTH, height), "white")
    draw = ImageDraw.Draw(canvas)
    text_left = _MARGIN + (head_side + 20 if header is not None else 0)
    if header is not None:
        _draw_tile(canvas, draw, Tile(header.image, [], header.kind, header.suspect), _MARGIN + 3, _MARGIN + 3,
                   head_side - 6)
    for n, line in enumerate(title):
        draw.text((text_left, _MARGIN + n * (_TITLE + 8)), line, font=_font(_TITLE if n == 0 else _TEXT),
                  fill=COLOURS["text"] if n == 0 else COLOURS["muted"])
    _legend(draw, text_left, _MARGIN + len(title) * (_TITLE + 8) + 8, legend)
    top = head_height
    for section in sections:
        draw.text((_MARGIN, top), section.title, font=_font(_TITLE), fill=COLOURS["text"])
        top += _TITLE + 14
        if not section.tiles:
            draw.text((_MARGIN, top), section.empty, font=_font(_TEXT), fill=COLOURS["muted"])
            top += _LINE
        for start in range(0, len(section.tiles), _PER_ROW):
            row = section.tiles[start:start + _PER_ROW]
            for n, tile in enumerate(row):
                _draw_tile(canvas, draw, tile, _MARGIN + n * (_TILE + _GAP), top + 3, _TILE - 6)
            top += _row_height(row) + 8
    return np.asarray(canvas)
