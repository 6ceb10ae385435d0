"""The figures' building blocks: the PNG writer (read back by PIL bit for bit), the heat colour table against the
colour map it samples, and the one-pass tile annotation against drawing tile by tile."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dmfast.figures import BLACK, WHITE, draw, draw_tiles, grid, heat_colors, heat_overlay
from dmfast.errors import SettingsError
from dmfast.io import png_bytes, save_png


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 33), (5, 9, 3), (40, 31, 3)])
def test_png_bytes_read_back_exactly(shape):
    array = np.random.default_rng(len(shape) + shape[0]).integers(0, 256, shape, dtype=np.uint8)
    array[..., : shape[1] // 2] = 200  # flat runs, as figures have
    back = np.asarray(Image.open(io.BytesIO(png_bytes(array))))
    assert back.shape == array.shape and np.array_equal(back, array)


def test_save_png_writes_gray_and_rgb_and_refuses_what_it_cannot(tmp_path):
    rgb = torch.randint(0, 256, (3, 12, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(Image.open(save_png(tmp_path / "a.png", rgb))), rgb.permute(1, 2, 0).numpy())
    gray = rgb[0]
    assert np.array_equal(np.asarray(Image.open(save_png(tmp_path / "b.png", gray))), gray.numpy())
    with pytest.raises(SettingsError, match="uint8"):
        save_png(tmp_path / "c.png", rgb.float())
    with pytest.raises(ValueError, match="empty"):
        save_png(tmp_path / "d.png", rgb[:, :0])


def test_heat_overlay_matches_the_colour_map_to_its_table_step():
    generator = torch.Generator().manual_seed(1)
    gray, heat = torch.rand(30, 20, generator=generator), torch.rand(30, 20, generator=generator) * 5 - 2
    normalised = (heat - heat.min()) / (heat.max() - heat.min())
    exact = (0.55 * gray[None] + 0.45 * heat_colors(normalised)) * 255  # the blend on the continuous map
    picture = heat_overlay(gray, heat)
    assert picture.dtype == torch.uint8 and picture.shape == (3, 30, 20)
    # the table samples the map at 1/255 steps: each channel moves by at most 4 x 0.5/255 per step, times alpha; the
    # gray is looked up at 1/255 steps too (0.5/255 times 1 - alpha)
    assert (picture.float() - exact).abs().max() <= 0.45 * 2 + 0.55 * 0.5 + 0.5 + 1e-4
    on_steps = (gray * 255).round() / 255  # X-rays as decoded: the lookup is then the float blend, rounded
    table = heat_colors((normalised * 255).round() / 255)
    stepped = ((on_steps[None] + 0.45 * (table - on_steps[None])) * 255).round().to(torch.uint8)
    difference = (heat_overlay(on_steps, heat).int() - stepped.int()).abs()  # the table's floats: ties may round
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99  # the other way
    assert torch.equal(heat_overlay(gray, None), (gray * 255).round().to(torch.uint8)[None].expand(3, -1, -1))
    mask = torch.zeros(30, 20)
    assert torch.equal(heat_overlay(gray, heat, where=mask), heat_overlay(gray, None))  # nothing blended off the mask


def test_drawing_all_tiles_at_once_equals_drawing_each():
    generator = torch.Generator().manual_seed(2)
    tiles = [torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=generator) for _ in range(5)]
    boxes = [[[3, 4, 20, 30]], [], [[0, 0, 50, 40], [10, 10, 12, 12]], [[5, 5, 6, 6]], [[30, 2, 48, 39]]]
    captions = ["a", None, "Effusion  p = 0.91", "", "b"]
    one_by_one = grid([draw(t, b, WHITE, width=2, text=c, text_size=12, halo=True)
                       for t, b, c in zip(tiles, boxes, captions)], columns=3)
    at_once = draw_tiles(grid(tiles, columns=3), [((k % 3 * 54, k // 3 * 44), b, c)
                                                   for k, (b, c) in enumerate(zip(boxes, captions))],
                         WHITE, width=2, text_size=12, halo=True, size=(50, 40))
    assert torch.equal(at_once, one_by_one)
    assert not torch.equal(draw(tiles[0], boxes[0], BLACK), tiles[0])


def _pil_drawn(image: torch.Tensor, boxes, color, width: int, text, text_size: int, halo: bool) -> torch.Tensor:
    """What drawing the whole image with PIL's ImageDraw gives: the pictures dmfast's drawing must equal."""
    from PIL import ImageDraw, ImageFont

    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    pen, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=text_size)
    for x0, y0, x1, y1 in boxes:
        corners = [float(x0), float(y0), max(float(x1) - 1, float(x0)), max(float(y1) - 1, float(y0))]
        if halo:
            pen.rectangle([corners[0] - 1, corners[1] - 1, corners[2] + 1, corners[3] + 1], outline=BLACK,
                          width=width + 2)
        pen.rectangle(corners, outline=color, width=width)
    if text:
        left, top, right, bottom = pen.textbbox((3, 2), text, font=font)
        pen.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=BLACK)
        pen.text((3, 2), text, fill=WHITE, font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)


def test_drawing_equals_pils_on_random_boxes_and_captions():
    """Outlines are drawn as bands of pixels (PIL only for captions and outlines thinner than their lines): the
    pictures are PIL's on boxes of every kind: float and integer corners, tiny, degenerate, partly or wholly
    outside the image, each line width, with and without a halo; captions longer than the image."""
    rng = np.random.default_rng(11)
    for case in range(300):
        image = torch.from_numpy(rng.integers(0, 256, (3, 45, 70), dtype=np.uint8))
        boxes = []
        for _ in range(int(rng.integers(0, 4))):
            x0, y0 = rng.uniform(-15, 80), rng.uniform(-15, 55)
            w, h = (rng.uniform(0, 6), rng.uniform(0, 6)) if rng.random() < 0.4 else (rng.uniform(0, 60),
                                                                                        rng.uniform(0, 40))
            if rng.random() < 0.3:
                x0, y0, w, h = (float(round(v)) for v in (x0, y0, w, h))
            boxes.append((x0, y0, x0 + w, y0 + h))
        width, halo = int(rng.integers(1, 5)), bool(rng.random() < 0.5)
        text = [None, "Edema  p = 0.42", "a caption much longer than the image is wide"][case % 3]
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        expected = _pil_drawn(image, boxes, color, width, text, 12, halo)
        assert torch.equal(draw(image, boxes, color, width, text, 12, halo), expected), (boxes, width, halo, text)


def test_drawing_leaves_its_input_and_takes_pils_colours_and_lines():
    image = grid([heat_overlay(torch.rand(30, 40), torch.rand(4, 5))], columns=1)  # interleaved, as figures are
    before = image.clone()
    drawn = draw(image, [(5, 5, 30, 25)], "red", width=2, text="Edema\np = 0.42", text_size=12, halo=True)
    assert torch.equal(image, before) and not torch.equal(drawn, before)
    assert torch.equal(drawn, draw(image, [(5, 5, 30, 25)], (255, 0, 0), 2, "Edema\np = 0.42", 12, True))
    assert torch.equal(drawn, _pil_drawn(image, [(5, 5, 30, 25)], (255, 0, 0), 2, "Edema\np = 0.42", 12, True))
    with pytest.raises(SettingsError, match="top left must lie in the image"):
        draw_tiles(image, [((-1, 0), [], "a")], size=(10, 10))
    from dmfast.figures import finding_panels

    with pytest.raises(SettingsError, match="no panels"):
        finding_panels(torch.rand(30, 40), [])


def test_round_ticks_by_hand():
    """Steps of 1, 2 or 5 times a power of ten, at most 6 ticks, inside the range (the validation AUROC axis of
    an earlier training.png read 0.797, 0.857, ...)."""
    from dmfast.figures import round_ticks

    assert round_ticks(0.4, 1.0) == [0.4, 0.6, 0.8, 1.0]  # 0.1 would give 7 ticks
    assert round_ticks(0.857, 1.0) == [0.9, 0.95, 1.0]
    assert round_ticks(0.7969, 0.8571) == [0.8, 0.82, 0.84]
    assert round_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert round_ticks(0.75, 1.2) == [0.8, 0.9, 1.0, 1.1, 1.2]
    assert round_ticks(0, 5e12) == [0, 1e12, 2e12, 3e12, 4e12, 5e12]  # a diverging loss still gets its axis
    assert round_ticks(1, 1) == [1.0]


def test_heat_on_a_fixed_scale_and_no_data_hatched():
    """On one scale a weak map stays faint where min-max would stretch it to full heat; NaN (no data) shows the
    bare image under hatching, never the colour of 'no disease'."""
    from dmfast.figures import NO_DATA, heat_overlay

    gray = torch.full((16, 16), 0.5)
    weak = torch.full((16, 16), 0.04)
    weak[0, 0] = 0.05
    fixed, stretched = heat_overlay(gray, weak, scale=(0.0, 1.0)), heat_overlay(gray, weak)
    assert not torch.equal(fixed[:, 8, 8], stretched[:, 8, 8])
    assert torch.equal(fixed[:, 8, 8], heat_overlay(gray, torch.full((16, 16), 0.04), scale=(0.0, 1.0))[:, 8, 8])
    assert torch.equal(stretched[:, 8, 8], heat_overlay(gray, torch.zeros(16, 16), scale=(0.0, 1.0))[:, 8, 8])
    missing = weak.clone()
    missing[:, 8:] = float("nan")
    picture = heat_overlay(gray, missing, scale=(0.0, 1.0))
    assert torch.equal(picture[:, 0, 0], fixed[:, 0, 0])  # known values as before
    hatch = torch.tensor(NO_DATA, dtype=torch.uint8)
    assert torch.equal(picture[:, 0, 8], hatch) and torch.equal(picture[:, 1, 15], hatch)  # (y + x) % 8 < 2
    assert (picture[:, 0, 12] == 128).all()  # the bare grey image between the hatch lines
