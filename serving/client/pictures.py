"""Feature maps and filters as pictures, for the client's CLI. Pillow only (it is in the serve
install already; matplotlib is not), and nothing of the server.

Each feature map is scaled to its own maximum (a ReLU map is >= 0), so that a faint detector
shows its pattern; a map that stays at 0 for this image is black. Kernels share one scale per
layer, blue below zero and red above, so that their strengths compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
TILE = 52  # pixels of one feature map or kernel in the grid
GAP = 2
COLUMNS = 16
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
# viridis at 5 points, interpolated into a 256-entry palette
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def _palette(anchors: npt.NDArray[np.float32]) -> list[int]:
    xs = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    rgb = np.stack([np.interp(t, xs, anchors[:, i]) for i in range(3)], axis=1)
    return [int(v) for v in rgb.round().astype(np.uint8).reshape(-1)]


VIRIDIS = _palette(_VIRIDIS)
DIVERGING = _palette(
    np.array(
        [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
        np.float32,
    )
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _tile(
    values: npt.NDArray[np.floating], low: float, high: float, palette: list[int], size: int = TILE
) -> Image.Image:
    span = high - low
    scaled = np.zeros(values.shape, np.float32) if span <= 0 else (values - low) / span
    index = (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)
    tile = Image.fromarray(index, mode="L").convert("P")
    tile.putpalette(palette)
    return tile.convert("RGB").resize((size, size), Image.Resampling.NEAREST)


def _grid(
    tiles: Sequence[Image.Image],
    columns: int = COLUMNS,
    gap: int = GAP,
    fill: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    size = tiles[0].width
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    grid = Image.new("RGB", (cols * (size + gap) - gap, rows * (size + gap) - gap), fill)
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * (size + gap), (i // columns) * (size + gap)))
    return grid


def _stack(header: Image.Image, sections: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    font = _font(15)
    margin, title = 12, 24
    width = max(header.width, *(g.width for _, g in sections)) + 2 * margin
    height = margin + header.height + sum(title + g.height + margin for _, g in sections) + margin
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = margin
    canvas.paste(header, (margin, y))
    y += header.height + margin
    for caption, grid in sections:
        draw.text((margin, y + 2), caption, fill=INK, font=font)
        y += title
        canvas.paste(grid, (margin, y))
        y += grid.height + margin
    return canvas


def _header(image: U8, lines: Sequence[str]) -> Image.Image:
    """The input image enlarged, and the lines of text beside it."""
    pixels = image[:, :, 0] if image.shape[2] == 1 else image
    shown = Image.fromarray(pixels).convert("RGB")
    scale = max(1, 112 // max(shown.size))
    shown = shown.resize((shown.width * scale, shown.height * scale), Image.Resampling.NEAREST)
    font = _font(16)
    header = Image.new("RGB", (shown.width + 520, max(shown.height, 22 * len(lines))), BACKGROUND)
    header.paste(shown, (0, 0))
    draw = ImageDraw.Draw(header)
    for i, line in enumerate(lines):
        draw.text((shown.width + 16, 4 + 22 * i), line, fill=INK, font=font)
    return header


def feature_maps_picture(
    image: U8,
    labels: Sequence[tuple[str, float]],
    maps: Mapping[str, F32],
    kinds: Mapping[str, str],
    title: str = "",
) -> Image.Image:
    """One grid per layer (one tile per channel), the image and the prediction on top."""
    best = ", ".join(f"{label} {score:.3f}" for label, score in labels)
    lines = [line for line in (title, f"prediction: {best}") if line]
    sections = []
    for name, values in maps.items():
        h, w, c = values.shape
        tiles = [
            _tile(
                values[:, :, i],
                min(0.0, float(values[:, :, i].min())),
                float(values[:, :, i].max()),
                VIRIDIS,
            )
            for i in range(c)
        ]
        sections.append((f"{name}  {kinds.get(name, '')}  {h}x{w}x{c}", _grid(tiles)))
    return _stack(_header(image, lines), sections)


def filters_picture(kernels: F32, biases: F32, layer: str, title: str = "") -> Image.Image:
    """One tile per kernel ([K, K, in, out]): in colour for RGB input, else on a diverging
    scale shared by the layer (the mean over the input channels when there are several)."""
    k1, k2, cin, cout = kernels.shape
    big = 2 * TILE
    if cin == 3:
        tiles = []
        for o in range(cout):
            kernel = kernels[:, :, :, o]
            low, high = float(kernel.min()), float(kernel.max())
            rgb = ((kernel - low) / (high - low or 1) * 255).round().astype(np.uint8)
            tiles.append(
                Image.fromarray(rgb, mode="RGB").resize((TILE, TILE), Image.Resampling.NEAREST)
            )
        how = "RGB, each kernel scaled to its own range"
    else:
        shown = kernels.mean(axis=2) if cin > 1 else kernels[:, :, 0, :]
        bound = float(np.abs(shown).max()) or 1.0
        tiles = [_tile(shown[:, :, o], -bound, bound, DIVERGING, big) for o in range(cout)]
        how = f"blue < 0 < red, |w| <= {bound:.3f}" + (
            f"; mean over {cin} input channels" if cin > 1 else ""
        )
    lines = [
        line
        for line in (
            title,
            f"{layer}: {cout} kernels of {k1}x{k2}x{cin}",
            how,
            f"biases {float(biases.min()):.3f} .. {float(biases.max()):.3f}" if biases.size else "",
        )
        if line
    ]
    font = _font(16)
    header = Image.new("RGB", (560, 22 * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(header)
    for i, line in enumerate(lines):
        draw.text((0, 22 * i), line, fill=INK, font=font)
    grid = _grid(tiles, columns=8, gap=6, fill=(90, 90, 90))
    return _stack(header, [(f"{layer}  {cout} filters", grid)])


def heat_overlay(image: U8, heat: F32, scale: int = 0) -> Image.Image:
    """The image (grey) under its heat map on the diverging scale, symmetric about 0 (white: no
    effect, red: evidence for the class, blue: against it), blended; enlarged `scale` times (0:
    to about 280 pixels), each pixel a square."""
    h, w = heat.shape
    scale = scale or max(1, 280 // max(h, w))
    pixels = image[:, :, 0] if image.shape[2] == 1 else image
    grey = Image.fromarray(pixels).convert("L").convert("RGB")
    bound = float(np.abs(heat).max()) or 1.0
    index = ((np.clip(heat / bound, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    colour = Image.fromarray(index, mode="L").convert("P")
    colour.putpalette(DIVERGING)
    blended = Image.blend(grey, colour.convert("RGB"), 0.6)
    return blended.resize((w * scale, h * scale), Image.Resampling.NEAREST)


def explanation_picture(image: U8, heat: F32, lines: Sequence[str]) -> Image.Image:
    """What was explained on top; below, the image as the model saw it and its heat map over it."""
    h, w = heat.shape
    scale = max(1, 280 // max(h, w))
    pixels = image[:, :, 0] if image.shape[2] == 1 else image
    shown = Image.fromarray(pixels).convert("RGB")
    shown = shown.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    overlay = heat_overlay(image, heat, scale)
    top = 22 * len(lines) + 8
    out = Image.new("RGB", (max(2 * shown.width + 16, 560), top + shown.height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    font = _font(16)
    for i, line in enumerate(lines):
        draw.text((0, 4 + 22 * i), line, fill=INK, font=font)
    out.paste(shown, (0, top))
    out.paste(overlay, (shown.width + 16, top))
    return out


def disagreements_picture(items: Sequence[tuple[U8, str, str]], title: str) -> Image.Image:
    """A rollout's latest disagreements: each image [H, W, C] with both versions' answers below
    it (two caption lines)."""
    font = _font(13)
    size, caption = 84, 34
    width = max(1, min(len(items), 8)) * (size + 8) + 8
    rows = max(1, -(-len(items) // 8))
    out = Image.new("RGB", (max(width, 320), 28 + rows * (size + caption + 8)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    draw.text((8, 6), title, fill=INK, font=font)
    for i, (image, first, second) in enumerate(items):
        x = 8 + (i % 8) * (size + 8)
        y = 28 + (i // 8) * (size + caption + 8)
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        tile = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
        out.paste(tile.resize((size, size), Image.Resampling.NEAREST), (x, y))
        draw.text((x, y + size + 2), first, fill=INK, font=font)
        draw.text((x, y + size + 17), second, fill=(178, 24, 43), font=font)
    return out
