"""Figures of the masks, eval and predict stages: heat maps over X-rays, boxes, labelled tiles, a colour bar. RGB
uint8 tensors ``[3, H, W]`` throughout, drawn with PIL (no plotting library needed)."""

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .data.dataset import FINDINGS
from .errors import SettingsError

# Anchor points of the heat colour map (dark blue -> blue -> cyan -> yellow -> red), as in the paper's figures.
_HEAT = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

RED = (255, 0, 0)
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
NO_DATA = (110, 110, 110)  # the hatching of areas a map says nothing about
TRUTH = (255, 0, 255)  # ground-truth boxes: magenta, which the heat colours never take
GRID_GAP = 4  # white pixels between the tiles of a grid


def heat_colors(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] ``[H, W]`` -> colours ``[3, H, W]`` in [0, 1]."""
    position = values.clamp(0, 1) * (len(_HEAT) - 1)
    low = position.floor().long().clamp(max=len(_HEAT) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * _HEAT[low] + frac * _HEAT[low + 1]).permute(2, 0, 1)


_HEAT_TABLE = heat_colors(torch.linspace(0, 1, 256)[None])[:, 0].T.contiguous()  # [256, 3]: a lookup per pixel


BARE, HATCH = 256, 257  # heat levels past the colour map's 256: no data, drawn as the bare gray or the hatching


@functools.lru_cache(maxsize=4)
def _blend_table(alpha: float) -> torch.Tensor:
    """``[256 * 258, 3]`` uint8: gray level g blended with the heat colour of level h at row ``g * 258 + h``, so
    that an overlay is one lookup per pixel (the picture of the float blend with its gray at 1/255 steps); the
    levels :data:`BARE` and :data:`HATCH` hold the bare gray and the hatching's colour (no data)."""
    gray = torch.arange(256, dtype=torch.float32)[:, None, None] / 255
    rgb = gray + alpha * (_HEAT_TABLE[None] - gray)  # [256 gray, 256 heat, 3]
    no_data = torch.cat([gray.expand(-1, 1, 3), torch.tensor(NO_DATA)[None, None].expand(256, 1, 3) / 255], 1)
    return (torch.cat([rgb, no_data], 1) * 255).round_().to(torch.uint8).reshape(-1, 3)


@functools.lru_cache(maxsize=4)
def _hatching(height: int, width: int) -> torch.Tensor:
    """``[H, W]`` bool: the lines of the no-data hatching (2 of every 8 diagonals)."""
    return (torch.arange(height)[:, None] + torch.arange(width)[None]) % 8 < 2


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the known values: NaN (no data) stays NaN; a constant map is 0."""
    missing = torch.isnan(image)
    if missing.all():
        return image
    low, high = image.nan_to_num(nan=float("inf")).min(), image.nan_to_num(nan=float("-inf")).max()
    return (image - low) / (high - low) if high > low else torch.where(missing, image, 0.0)


def heat_overlay(gray: torch.Tensor, heat: torch.Tensor | None, alpha: float = 0.45,
                 where: torch.Tensor | None = None, scale: tuple | None = None) -> torch.Tensor:
    """A grayscale image ``[H, W]`` in [0, 1] with ``heat`` (any size) blended over it: min-max normalised here, or
    on the fixed range ``scale = (low, high)`` (so that panels compare); NaN heat is no data, drawn as the bare
    image under grey hatching. ``where`` ([H, W] in [0, 1]) limits the blend (e.g. to a mask). Returns RGB uint8
    ``[3, H, W]``. The heat's colours come from a 256-entry table (the colour map at 1/255 steps)."""
    if heat is not None and heat.shape != gray.shape:
        heat = F.interpolate(heat.float()[None, None], size=gray.shape, mode="bilinear", align_corners=False)[0, 0]
    if heat is not None and where is None:  # the overlays of predict and eval: one table lookup per pixel
        heat = heat.float()
        missing = torch.isnan(heat)
        share = normalize(heat) if scale is None else ((heat - scale[0]) / max(scale[1] - scale[0], 1e-12)).clamp_(0, 1)
        level = (share.nan_to_num_(0.0) * 255).round_().to(torch.int32)
        if missing.any():  # no data: the bare image, hatched
            level[missing] = (BARE + _hatching(*gray.shape)[missing]).to(torch.int32)
        level += (gray.float().clamp(0, 1) * 255).round_().to(torch.int32) * 258
        colours = np.take(_blend_table(float(alpha)).numpy(), level.numpy().ravel(), axis=0)  # numpy's: 2x torch's
        return torch.from_numpy(colours).view(*gray.shape, 3).permute(2, 0, 1)
    rgb = gray.float().clamp(0, 1)[..., None]  # [H, W, 1], broadcast over the channels
    if heat is not None:
        colors = _HEAT_TABLE[(normalize(heat) * 255).round_().long()]  # [H, W, 3]
        rgb = torch.lerp(rgb, colors, alpha * where.float()[..., None])
    return (rgb.expand(*gray.shape, 3) * 255).round_().to(torch.uint8).permute(2, 0, 1)


def _font(size: int | None):
    from PIL import ImageFont

    return ImageFont.load_default(size=size) if size else ImageFont.load_default()


def draw(image: torch.Tensor, boxes=(), color=BLACK, width: int = 2, text: str | None = None,
         text_size: int | None = None, halo: bool = False) -> torch.Tensor:
    """Rectangles ``(x0, y0, x1, y1)`` (inclusive-exclusive pixels) and a caption (white on black, top left)
    drawn onto an RGB uint8 image. ``halo`` outlines each rectangle in black, so that a light colour stays
    visible on bright regions too."""
    return draw_tiles(image, [((0, 0), boxes, text)], color, width, text_size, halo)


def draw_tiles(image: torch.Tensor, tiles: list, color=BLACK, width: int = 2, text_size: int | None = None,
               halo: bool = False, size: tuple | None = None) -> torch.Tensor:
    """:func:`draw` on several tiles of one image at once: ``tiles`` are ``((x, y) of the tile's top left, boxes in
    the tile's pixels, caption or None)``, each drawn inside its tile (``size``: its ``(width, height)``, default
    the whole image) exactly as :func:`draw` draws it alone."""
    pixels = image.permute(1, 2, 0).numpy().copy()  # a copy: the caller's image stays as it is
    if any(x < 0 or y < 0 for (x, y), _, _ in tiles):
        raise SettingsError(f"draw_tiles: a tile's top left must lie in the image, got {[xy for xy, _, _ in tiles]}")
    _draw_on(pixels, tiles, color, width, _font(text_size), halo, size or (pixels.shape[1], pixels.shape[0]))
    return torch.from_numpy(pixels).permute(2, 0, 1)  # a view: the pixels stay interleaved (see grid)


def _draw_on(pixels: np.ndarray, tiles: list, color, width: int, font, halo: bool, size: tuple) -> None:
    """:func:`draw_tiles` on ``[H, W, 3]`` uint8 pixels, in place, each tile clipped to itself. The pictures are
    PIL's (ImageDraw's rectangles and text), without taking the whole figure through PIL: an outline is two bands
    of rows and two of columns, at PIL's corners (truncated to ints); the captions, and outlines thinner than
    twice their line (which PIL draws its own way), are drawn by PIL on a crop from the tile's corner."""
    from PIL import Image, ImageColor, ImageDraw

    color = ImageColor.getrgb(color) if isinstance(color, str) else color  # PIL's colour names and "#rrggbb" too
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # text extents as PIL's drawing measures them
    for (x, y), boxes, text in tiles:
        tile = pixels[y:y + size[1], x:x + size[0]]
        for x0, y0, x1, y1 in boxes:
            corners = [float(x0), float(y0), max(float(x1) - 1, float(x0)), max(float(y1) - 1, float(y0))]
            if halo:
                _outline(tile, [corners[0] - 1, corners[1] - 1, corners[2] + 1, corners[3] + 1], BLACK, width + 2)
            _outline(tile, corners, color, width)
        if text:
            left, top, right, bottom = measure.textbbox((3, 2), text, font=font)

            def caption(pen, box=(left - 2, top - 1, right + 2, bottom + 1)):
                pen.rectangle(box, fill=BLACK)
                pen.text((3, 2), text, fill=WHITE, font=font)
            _paint(tile, right + 3, bottom + 2, caption)


def _paint(pixels: np.ndarray, right: int, bottom: int, paint) -> None:
    """``paint(pen)`` with PIL on ``pixels[:bottom, :right]`` (``[H, W, 3]`` uint8), in place: PIL clips at that
    region's edges as it would at an image's."""
    from PIL import Image, ImageDraw

    right, bottom = min(right, pixels.shape[1]), min(bottom, pixels.shape[0])
    if right > 0 and bottom > 0:
        crop = Image.fromarray(np.ascontiguousarray(pixels[:bottom, :right]))
        paint(ImageDraw.Draw(crop))
        pixels[:bottom, :right] = np.asarray(crop)


def _outline(tile: np.ndarray, corners: list, color, width: int) -> None:
    """PIL's ``rectangle(corners, outline=color, width=width)`` on a tile (clipped to it)."""
    x0, y0, x1, y1 = (int(c) for c in corners)  # PIL truncates float corners towards zero
    if x1 - x0 < 2 * width or y1 - y0 < 2 * width:  # thinner than its two lines: PIL's own way, whose inner
        reach = width + 1  # lines may end a line's width past the corners
        _paint(tile, max(x0, x1) + reach, max(y0, y1) + reach,
               lambda pen: pen.rectangle(corners, outline=color, width=width))
        return
    height, breadth = tile.shape[:2]
    rgb = np.array(color, dtype=np.uint8)
    for top, bottom, left, right in ((y0, y0 + width - 1, x0, x1), (y1 - width + 1, y1, x0, x1),
                                     (y0, y1, x0, x0 + width - 1), (y0, y1, x1 - width + 1, x1)):
        top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height - 1), min(right, breadth - 1)
        if top <= bottom and left <= right:
            tile[top:bottom + 1, left:right + 1] = rgb


def _bar_pixels(height: int, width: int, text_size: int) -> np.ndarray:
    """A vertical heat colour bar (high at the top) on white, its labels left to :func:`_label_bar`: ``[height,
    width, 3]`` uint8."""
    margin = text_size + 6
    strip = heat_colors(torch.linspace(1, 0, max(height - 2 * margin, 2))[:, None].expand(-1, width // 3))
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    out[margin:margin + strip.shape[1], 4:4 + strip.shape[2]] = (strip * 255).round().to(torch.uint8).permute(
        1, 2, 0).numpy()
    return out


def _label_bar(bar: np.ndarray, low: str, high: str, font, text_size: int) -> None:
    """The labels of a colour bar's pixels (:func:`_bar_pixels`), in place: ``high`` at its top, ``low`` at its
    bottom."""
    def labels(pen):
        pen.text((2, 1), high, fill=BLACK, font=font)
        pen.text((2, bar.shape[0] - text_size - 3), low, fill=BLACK, font=font)
    _paint(bar, bar.shape[1], bar.shape[0], labels)


def finding_panels(gray: torch.Tensor, panels: list, columns: int = 4, scale: tuple | None = None,
                   bar: tuple = ("CAM min", "CAM max"), title: str | None = None) -> torch.Tensor:
    """One X-ray ``[H, W]`` (in [0, 1]) shown once per panel ``(caption, heat [H, W] or None, boxes)``: the heat
    blended over it (on the fixed range ``scale``, else min-max per panel; NaN: no data, hatched), the boxes in
    white with a black halo, the caption written on it over the boxes; panels in rows of ``columns`` with a colour
    bar of the heat at the right labelled ``bar`` (low, high), and ``title`` above them all. Drawn on one canvas,
    only its text through PIL (a 14-panel 512-px figure is 13 MB)."""
    if not panels:
        raise SettingsError("finding_panels: no panels")
    size = max(12, min(28, max(gray.shape) // 24))
    columns = min(columns, len(panels))
    height, width = gray.shape
    step_y, step_x = height + GRID_GAP, width + GRID_GAP
    rows = (len(panels) + columns - 1) // columns
    top = size + 10 if title is not None else 0  # the title's strip
    grid_height, grid_width = rows * step_y - GRID_GAP, columns * step_x - GRID_GAP
    canvas = np.full((top + grid_height, grid_width + 4 + 5 * size, 3), 255, dtype=np.uint8)
    pixels = torch.from_numpy(canvas)
    for k, (_, heat, _) in enumerate(panels):
        y, x = top + k // columns * step_y, k % columns * step_x
        pixels[y:y + height, x:x + width] = heat_overlay(gray, heat, scale=scale).permute(1, 2, 0)
    canvas[top:, grid_width + 4:] = _bar_pixels(grid_height, 5 * size, size)
    font = _font(size)
    _draw_on(canvas, [((k % columns * step_x, top + k // columns * step_y), boxes, caption)
                      for k, (caption, _, boxes) in enumerate(panels)], WHITE, max(2, size // 8), font, True,
             (width, height))
    _label_bar(canvas[top:, grid_width + 4:], bar[0], bar[1], font, size)
    if title is not None:  # on its strip, clipped to it
        _paint(canvas, canvas.shape[1], top, lambda pen: pen.text((4, 4), title, fill=BLACK, font=font))
    return torch.from_numpy(canvas).permute(2, 0, 1)


def grid(tiles: list, columns: int, gap: int = GRID_GAP) -> torch.Tensor:
    """Equal-size RGB uint8 tiles in rows of ``columns``, on a white background. Like the other figures, a ``[3, H,
    W]`` view of interleaved ``[H, W, 3]`` pixels: PIL and PNG take those without a transposing copy."""
    if not tiles:
        raise SettingsError("grid: no tiles")
    _, height, width = tiles[0].shape
    rows = (len(tiles) + columns - 1) // columns
    out = torch.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=torch.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        out[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = \
            tile.permute(1, 2, 0)
    return out.permute(2, 0, 1)


def masks_figure(anchor: torch.Tensor, payload: dict, tile: int = 192) -> torch.Tensor:
    """The masks over the anchor image, one labelled tile per class (the paper's Fig. 3): the averaged map as heat
    inside the mask, the anchor elsewhere."""
    gray = F.interpolate(anchor.float().reshape(1, 1, *anchor.shape[-2:]), size=(tile, tile), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0]
    gray = (gray - gray.min()) / (gray.max() - gray.min()).clamp_min(1e-12)
    tiles = []
    for c, name in enumerate(FINDINGS):
        mask = F.interpolate(payload["masks"][c][None, None], size=(tile, tile), mode="nearest")[0, 0]
        heat = payload["average"][c] if payload["kind"] == "DM" else payload["masks"][c]
        count = payload.get("counts", {}).get(name)
        label = name if count is None else f"{name} ({count})"
        tiles.append(draw(heat_overlay(gray, heat, 0.55, where=mask), text=label))
    return grid(tiles, columns=7)


# 14 distinguishable colours (Tableau's 20 without the lightest), one per finding in the per-class curves
CLASS_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
                 (152, 223, 138), (255, 152, 150))


def round_ticks(low: float, high: float, most: int = 6) -> list:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering ``low``..``high``, at most ``most``."""
    span = max(high - low, 1e-12)
    start = int(np.floor(np.log10(span / most))) - 1
    step = next(m * 10.0 ** e for e in range(start, start + 4) for m in (1, 2, 5)
                if span / (m * 10.0 ** e) <= most - 1)  # never empty: 10 ** (start + 2) > span / 6
    first = np.ceil(low / step - 1e-9) * step
    return [round(float(first + k * step), 12) for k in range(int(np.floor((high - first) / step + 1e-9)) + 1)]


def line_panel(series: list, title: str, low: float, high: float, width: int = 440, height: int = 300,
               marked: int | None = None, legend: list = ()) -> torch.Tensor:
    """A small line chart on white: ``series`` of ``(values per epoch, RGB colour, line width)`` (None/NaN values
    are gaps), epochs 1..n along x, ``low``..``high`` along y with round ticks, its title; ``marked``: an epoch
    (1-based) drawn as a dashed vertical line and named; ``legend``: ``(label, colour)`` pairs listed below."""
    from PIL import Image, ImageDraw

    per_row = 3
    rows = -(-len(legend) // per_row)
    canvas = Image.new("RGB", (width, height + 16 * rows), WHITE)
    pen = ImageDraw.Draw(canvas)
    font = _font(12)
    left, top, right, bottom = 48, 24, width - 12, height - 28
    pen.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    pen.text((left, 4), title, fill=BLACK, font=font)
    count = max((len(values) for values, _, _ in series), default=1)
    x_of = lambda i: left + (right - left) * (i / max(count - 1, 1))  # noqa: E731
    y_of = lambda v: bottom - (bottom - top) * ((v - low) / (high - low) if high > low else 0.5)  # noqa: E731
    for value in round_ticks(low, high):  # y grid and labels
        pen.line([left, y_of(value), right, y_of(value)], fill=(232, 232, 232))
        pen.text((4, y_of(value) - 7), f"{value:g}", fill=BLACK, font=font)
    for i in range(count):
        if (count <= 12 or i % -(-count // 12) == 0) and i + 1 != marked:  # the marked epoch is named there
            pen.text((x_of(i) - 4, bottom + 6), str(i + 1), fill=BLACK, font=font)
    if marked is not None and 1 <= marked <= count:
        x = x_of(marked - 1)
        for y in range(top, bottom, 8):
            pen.line([x, y, x, min(y + 4, bottom)], fill=(90, 90, 90), width=1)
        label = f"best epoch {marked}"  # on white below the axis, clear of the curves
        pen.text((min(max(x - pen.textlength(label, font=font) / 2, left), right - pen.textlength(label, font=font)),
                  bottom + 6), label, fill=(90, 90, 90), font=font)
    for values, color, line in series:
        points = [(x_of(i), y_of(v)) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
        if len(points) > 1:
            pen.line(points, fill=color, width=line)
        for x, y in points:
            pen.ellipse([x - line - 1, y - line - 1, x + line + 1, y + line + 1], fill=color)
    for k, (label, color) in enumerate(legend):
        x, y = 8 + (k % per_row) * (width - 16) // per_row, height - 6 + 16 * (k // per_row)
        pen.rectangle([x, y + 4, x + 10, y + 8], fill=color)
        pen.text((x + 14, y), label, fill=BLACK, font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def training_figure(history: list) -> torch.Tensor:
    """The curves of a training run from its per-epoch metrics: the training and validation loss, and the
    validation AUROC (the mean bold black, each class in its colour, named below); the best epoch (the highest
    validation mean AUROC, the one best.pt keeps) marked on both."""
    def series(key, source):
        return [source(m).get(key) if source(m) else None for m in history]

    loss, held_out = [m.get("loss") for m in history], [m.get("val_loss") for m in history]
    finite = [v for v in loss + held_out if v is not None and np.isfinite(v)] or [0.0, 1.0]
    mean = series("mean_auroc", lambda m: m)
    scored = [(v, i + 1) for i, v in enumerate(mean) if v is not None and np.isfinite(v)]
    best = max(scored, key=lambda s: (s[0], -s[1]))[1] if scored else None  # the first of equals, as best.pt
    low, high = min(finite), max(finite)
    margin = (high - low) * 0.05 or abs(high) * 0.05 or 0.05
    panels = [line_panel([(loss, (31, 119, 180), 2), (held_out, (255, 127, 14), 2)],
                         "weighted BCE: training (blue, per batch), validation (orange, whole set)", low - margin,
                         high + margin,
                         marked=best)]
    per_class = [(series(c, lambda m: m.get("auroc")), CLASS_COLOURS[i], 1) for i, c in enumerate(FINDINGS)]
    values = [v for s, _, _ in per_class + [(mean, None, None)] for v in s if v is not None and np.isfinite(v)]
    panels.append(line_panel(per_class + [(mean, BLACK, 3)], "validation AUROC per epoch (mean: black)",
                             np.floor(min([0.5] + values) * 10) / 10, 1.0, marked=best,
                             legend=[(c, CLASS_COLOURS[i]) for i, c in enumerate(FINDINGS)]))
    height = max(p.shape[1] for p in panels)  # the legend makes the second taller: pad the first
    panels = [torch.cat([p, torch.full((3, height - p.shape[1], p.shape[2]), 255, dtype=torch.uint8)], 1)
              for p in panels]
    return grid(panels, columns=2, gap=8)
