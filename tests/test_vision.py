"""InternVL image preprocessing: grid choice, tiles, pixels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmprm_infer.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_CONTEXT_TOKEN,
    ImageLoadError,
    InternVLImageConfig,
    closest_tile_grid,
    image_token_block,
    load_image,
    load_images,
    num_tiles,
)

# ---- an independent, plain restatement of InternVL2.5's dynamic_preprocess


def reference_grid(width, height, max_num, min_num=1, image_size=448):
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    ratios = sorted(ratios, key=lambda r: r[0] * r[1])
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    return best


def reference_pixels(image, max_num, image_size=448):
    """InternVL's load_image with torchvision's ToTensor/Normalize spelled out."""
    image = image.convert("RGB")
    cols, rows = reference_grid(*image.size, max_num, image_size=image_size)
    resized = image.resize((cols * image_size, rows * image_size))  # PIL default: bicubic
    tiles = []
    for i in range(cols * rows):
        c, r = i % cols, i // cols
        tiles.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)))
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    out = []
    for t in tiles:
        x = torch.from_numpy(np.array(t, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
        out.append(x.sub_(mean).div_(std))
    return torch.stack(out)


def random_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).convert(mode)


# ---------------------------------------------------------------- grid


@pytest.mark.parametrize(
    "size,max_tiles,grid",
    [
        ((448, 448), 6, (1, 1)),
        ((600, 600), 6, (1, 1)),  # area 360000 < 0.5*448^2*4: stays 1x1
        ((800, 800), 6, (2, 2)),  # area 640000 > 401408: tie goes to 2x2
        ((1000, 1000), 12, (3, 3)),
        ((640, 480), 6, (3, 2)),
        ((900, 300), 6, (3, 1)),
        ((1800, 600), 12, (3, 1)),  # 3:1 tie with 6x2, too small for it
        ((2400, 800), 12, (6, 2)),  # ... large enough for it
        ((20000, 300), 6, (6, 1)),
        ((300, 20000), 6, (1, 6)),
        ((300, 20000), 1, (1, 1)),
        # the area exactly half the larger grid's (0.5 * 448^2 * cols * rows): "more than half"
        # is strict, so the tie stays with the smaller grid
        ((896, 1008), 12, (2, 2)),  # 903168 = half of 3x3; 8:9 ties 1:1 with 2x2 and 3x3
        ((1008, 896), 12, (2, 2)),
        ((1024, 882), 12, (2, 2)),  # 903168 again, aspect 512:441
        ((2048, 588), 12, (3, 1)),  # 1204224 = half of 6x2; 3:1 ties with 6x2
        ((2049, 588), 12, (6, 2)),  # one pixel column more: past half, the larger grid (3:1 and 6:2 tie always)
        ((1025, 882), 12, (3, 3)),  # likewise past half of 3x3 (1:1 still closest, tied between 2x2 and 3x3)
    ],
)
def test_grid_examples(size, max_tiles, grid):
    assert closest_tile_grid(*size, max_tiles=max_tiles) == grid
    assert reference_grid(*size, max_tiles) == grid


def test_grid_matches_reference_on_sweep():
    for max_tiles in (1, 2, 4, 6, 9, 12):
        for w in range(16, 3000, 53):
            for h in range(16, 3000, 61):
                assert closest_tile_grid(w, h, max_tiles=max_tiles) == reference_grid(w, h, max_tiles), (w, h)


def test_grid_matches_reference_at_exact_ties():
    # Images whose aspect ratio is exactly the midpoint of two grids' ratios.
    from fractions import Fraction

    for max_tiles in (4, 6, 12):
        grids = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if i * j <= max_tiles]
        for a in grids:
            for b in grids:
                mid = (Fraction(*a) + Fraction(*b)) / 2
                for k in (1, 50, 300):
                    w, h = mid.numerator * k, mid.denominator * k
                    assert closest_tile_grid(w, h, max_tiles=max_tiles) == reference_grid(w, h, max_tiles)


# ---------------------------------------------------------------- tiles and pixels


@pytest.mark.parametrize("size,max_tiles", [((640, 480), 6), ((300, 900), 6), ((1000, 1000), 12), ((200, 150), 1)])
def test_pixels_equal_internvl_reference(size, max_tiles):
    image = random_image(*size, seed=size[0])
    got = load_image(image, max_tiles=max_tiles)
    want = reference_pixels(image, max_tiles)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)


def test_tile_count_and_thumbnail():
    image = random_image(900, 600)  # 3:2 -> 3x2 grid
    assert load_image(image).shape == (7, 3, 448, 448)
    assert num_tiles(900, 600) == 7
    no_thumb = load_image(image, use_thumbnail=False)
    assert no_thumb.shape == (6, 3, 448, 448)
    assert torch.equal(no_thumb, load_image(image)[:6])
    one = load_image(random_image(448, 448))
    assert one.shape == (1, 3, 448, 448)  # a single tile gets no thumbnail
    assert load_image(image, tile_size=224).shape == (7, 3, 224, 224)


def test_matches_transformers_pil_processor():
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "GotOcr2ImageProcessorPil", None)
    if proc_cls is None:
        pytest.skip("this transformers has no GotOcr2ImageProcessorPil")
    proc = proc_cls(
        size={"height": 448, "width": 448},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_to_patches=True,
        max_patches=6,
    )
    for size in [(640, 480), (1500, 400), (37, 1200)]:
        image = random_image(*size, seed=1)
        hf = proc(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(load_image(image), hf), size


def test_normalization_on_solid_colour():
    x = load_image(Image.new("RGB", (300, 200), (255, 128, 0)))
    rgb = torch.tensor([255, 128, 0], dtype=torch.float32) / 255
    want = (rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape[1:] == (3, 448, 448)
    for c in range(3):
        assert torch.allclose(x[:, c], torch.full_like(x[:, c], want[c].item()), atol=1e-6)


# ---------------------------------------------------------------- modes


def test_modes_convert_like_pil_rgb():
    base = random_image(500, 300, seed=3)
    rgba = base.copy()
    rgba.putalpha(0)  # fully transparent: InternVL drops alpha, keeps RGB
    assert torch.equal(load_image(rgba), load_image(base))
    for mode in ("L", "P", "LA", "1", "CMYK"):
        image = base.convert(mode)
        assert torch.equal(load_image(image), load_image(image.convert("RGB"))), mode
    grey = load_image(Image.new("L", (100, 100), 100))
    value = torch.tensor(100 / 255, dtype=torch.float32)
    for c in range(3):
        want = (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(grey[0, c], torch.full_like(grey[0, c], want.item()), atol=1e-6)


def test_path_input_and_load_images(tmp_path):
    image = random_image(640, 480, seed=4)
    path = tmp_path / "figure.png"
    image.save(path)
    assert torch.equal(load_image(path), load_image(image))
    assert torch.equal(load_image(str(path)), load_image(image))
    assert load_images(None) == []
    assert len(load_images(path)) == 1
    both = load_images([path, image], max_tiles=1)
    assert [t.shape[0] for t in both] == [1, 1]


# ---------------------------------------------------------------- errors


def test_missing_file_error_names_the_file(tmp_path):
    missing = tmp_path / "no_such_figure.png"
    with pytest.raises(ImageLoadError, match="no_such_figure.png"):
        load_image(missing)


def test_unreadable_file_error_names_the_file(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ImageLoadError, match="not_an_image.png"):
        load_image(bad)
    with pytest.raises(ImageLoadError):
        load_image(tmp_path)  # a directory


def test_zero_size_and_bad_type():
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))
    with pytest.raises(ImageLoadError, match="zero size"):
        closest_tile_grid(10, 0)
    with pytest.raises(TypeError, match="PIL.Image"):
        load_image(123)


def test_huge_image_stays_in_cap_and_is_resized_before_any_array(image_work):
    """A 20000 px image: resized as uint8 to the capped tile grid, only tile-sized images become arrays
    (what keeps it fast and small, checked without a clock)."""
    for size, grid in [((20000, 300), (6 * 448, 448)), ((300, 20000), (448, 6 * 448))]:
        image_work.resized.clear()
        image_work.arrays.clear()
        x = load_image(Image.new("RGB", size, (10, 20, 30)))
        assert x.shape == (7, 3, 448, 448)  # 6 tiles + thumbnail
        assert image_work.resized == [grid, (448, 448)]  # the tile grid, then the thumbnail
        assert image_work.arrays and set(image_work.arrays) == {(448, 448)}
    assert load_image(Image.new("RGB", (20000, 300)), max_tiles=12).shape[0] <= 13


# ---------------------------------------------------------------- tokens and config


def test_image_token_block():
    block = image_token_block(7)
    assert block.startswith("<img>") and block.endswith("</img>")
    assert block.count(IMG_CONTEXT_TOKEN) == 7 * 256
    assert len(block) == len("<img>") + 7 * 256 * len(IMG_CONTEXT_TOKEN) + len("</img>")
    assert image_token_block(2, tokens_per_tile=64).count(IMG_CONTEXT_TOKEN) == 128
    with pytest.raises(ValueError):
        image_token_block(0)


def test_config_from_model_configs():
    from transformers import InternVLConfig

    hf = InternVLImageConfig.from_model_config(InternVLConfig())
    assert (hf.tile_size, hf.tokens_per_tile, hf.max_tiles) == (448, 256, 6)
    chat = {
        "force_image_size": 448,
        "downsample_ratio": 0.5,
        "use_thumbnail": True,
        "vision_config": {"image_size": 448, "patch_size": 14},
    }
    cfg = InternVLImageConfig.from_model_config(chat, max_tiles=12)
    assert (cfg.tile_size, cfg.tokens_per_tile, cfg.max_tiles) == (448, 256, 12)
    small = InternVLImageConfig.from_model_config(
        {"vision_config": {"image_size": 224, "patch_size": 14}, "downsample_ratio": 0.5}
    )
    assert (small.tile_size, small.tokens_per_tile) == (224, 64)
    assert load_image(random_image(500, 500), config=small).shape[-1] == 224
    with pytest.raises(ValueError):
        InternVLImageConfig(max_tiles=0)
