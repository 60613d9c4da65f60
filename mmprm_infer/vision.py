"""InternVL dynamic-resolution image preprocessing.

Reproduces ``load_image`` / ``dynamic_preprocess`` / ``build_transform`` of
InternVL2.5 (the code MM-PRM and VisualPRM ship and evaluate with):

1. ``Image.convert("RGB")`` (alpha is dropped, not composited; EXIF
   orientation is not applied -- InternVL does neither).
2. Pick the tile grid (cols x rows, min_tiles <= cols*rows <= max_tiles)
   whose aspect ratio cols/rows is closest to width/height.  On an exact tie
   a later (larger) grid wins only while the image area exceeds half the
   grid's pixel area.
3. Resize to (cols*tile, rows*tile) with PIL bicubic, cut tiles row-major,
   append a bicubic ``tile x tile`` thumbnail of the original when there is
   more than one tile.
4. ``ToTensor`` (uint8 -> float32 / 255) and ``Normalize(mean, std)``.

Why our own code and not transformers' ``GotOcr2ImageProcessor`` (what
``InternVLProcessor`` uses)?  Checked against transformers 5.19:
- its grid rule is the same formula, but it walks same-area grids in a fixed
  (cols, rows) order where InternVL walks a Python ``set``; at every exact
  tie point for 1..12 tiles the two still pick the same grid, but only
  empirically -- we keep InternVL's own order;
- its PIL backend (``GotOcr2ImageProcessorPil``) gives bit-identical pixels,
  but ``AutoImageProcessor`` picks the torchvision backend whenever
  torchvision is installed, and that one resizes with torch interpolation,
  so pixels differ from InternVL's PIL bicubic;
- its public kwargs cannot turn the thumbnail off.
tests/test_vision.py asserts bit equality with the PIL backend, so a drift
on either side shows up there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Image.Image | str | os.PathLike

# The only formats Pillow is asked to decode (Image.open's ``formats=``): plain raster formats.  Left to
# itself, Image.open tries every plugin it has -- EPS among them, which runs Ghostscript on the file's
# PostScript -- so an image from a user or a client is never opened without this list.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
IMAGE_FORMATS_TEXT = "PNG, JPEG, GIF, WebP, BMP or TIFF"


def open_image(fp) -> Image.Image:
    """``PIL.Image.open`` limited to ``IMAGE_FORMATS`` (lazy: pixels are decoded on ``load``); a file in
    any other format raises ``PIL.UnidentifiedImageError`` without another decoder being tried."""
    return Image.open(fp, formats=IMAGE_FORMATS)


class ImageLoadError(ValueError):
    """An image could not be opened, decoded or tiled."""


@dataclass(frozen=True)
class InternVLImageConfig:
    """Preprocessing constants of one InternVL checkpoint.

    Defaults are InternVL2.5-8B's (448 px tiles, ImageNet normalization,
    256 tokens per tile) with MM-PRM's evaluation budget of 6 tiles.
    """

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tokens_per_tile: int = 256

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                f"need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, "
                f"max_tiles={self.max_tiles}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} / {self.std}")

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> InternVLImageConfig:
        """Tile size and tokens per tile from a model config (object or dict).

        Reads both layouts: transformers' ``InternVLConfig`` (vision_config.
        image_size / patch_size, downsample_ratio, image_seq_length) and
        InternVL's own ``InternVLChatConfig`` (force_image_size, use_thumbnail).
        The tile budget (max_tiles) is a usage choice, not read from the
        config: pass it in ``overrides``.
        """
        vision = _get(config, "vision_config")
        tile = _get(config, "force_image_size") or _get(vision, "image_size")
        patch = _get(vision, "patch_size")
        ratio = _get(config, "downsample_ratio")
        values: dict[str, Any] = {}
        if tile is not None:
            values["tile_size"] = int(_first(tile))
        seq_len = _get(config, "image_seq_length")
        if seq_len is not None:
            values["tokens_per_tile"] = int(seq_len)
        elif tile is not None and patch is not None and ratio is not None:
            side = int(_first(tile)) // int(_first(patch))
            values["tokens_per_tile"] = int(round(side * side * ratio * ratio))
        thumb = _get(config, "use_thumbnail")
        if thumb is not None:
            values["use_thumbnail"] = bool(thumb)
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> InternVLImageConfig:
        """Copy with the given non-None fields replaced."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if v is not None and k in known})


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- grid choice


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in
    InternVL's iteration order: a Python set sorted (stably) by area.  The
    set order decides ties between same-area grids, so it is kept as is."""
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_tile_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 6, tile_size: int = 448
) -> tuple[int, int]:
    """InternVL's ``find_closest_aspect_ratio``: the (cols, rows) grid for an image."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"image has zero size ({width}x{height}); pass a non-empty image")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            # Same aspect error: take the larger grid only while the image
            # has pixels enough to fill half of it.
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, config: InternVLImageConfig | None = None) -> int:
    """Tiles (thumbnail included) an image of this size yields, without pixels."""
    cfg = config or InternVLImageConfig()
    cols, rows = closest_tile_grid(
        width, height, min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, tile_size=cfg.tile_size
    )
    blocks = cols * rows
    return blocks + 1 if cfg.use_thumbnail and blocks != 1 else blocks


# ---------------------------------------------------------------- tiling


def dynamic_preprocess(image: Image.Image, config: InternVLImageConfig | None = None) -> list[Image.Image]:
    """InternVL's ``dynamic_preprocess`` on an RGB PIL image: the tiles, then
    the thumbnail (when more than one tile), each ``tile x tile``."""
    cfg = config or InternVLImageConfig()
    tile = cfg.tile_size
    width, height = image.size
    cols, rows = closest_tile_grid(
        width, height, min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, tile_size=tile
    )
    # PIL resizes the uint8 image first, so a huge input never becomes a
    # full-resolution float tensor.  (Image.resize's default for RGB is
    # bicubic; it is spelled out here.)
    resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    if cfg.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def tiles_to_tensor(tiles: Sequence[Image.Image], config: InternVLImageConfig | None = None) -> torch.Tensor:
    """torchvision's ToTensor + Normalize on each tile -> [tiles, 3, H, W] float32.

    The same float32 ops in the same order as torchvision (x / 255, then
    (x - mean) / std), so no torchvision is needed; the tests check bit
    equality with a restatement of those two transforms and with
    transformers' PIL image processor (torchvision is not installed here).
    """
    cfg = config or InternVLImageConfig()
    import numpy as np  # here, not at the top: `import mmprm_infer.formats` (and `mmprm --help`) needs no torch
    import torch  # torch: heavy, loaded where used

    pixels = np.stack([np.asarray(t.convert("RGB") if t.mode != "RGB" else t) for t in tiles])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub(mean).div(std).contiguous()


# ---------------------------------------------------------------- public API


def open_rgb(image: ImageInput) -> Image.Image:
    """A PIL image or a path -> RGB PIL image, with errors that name the input."""
    if isinstance(image, Image.Image):
        rgb = _to_rgb(image, "(PIL.Image)")
    elif isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open_image(path) as opened:
                opened.load()
                rgb = _to_rgb(opened, repr(path))
        except FileNotFoundError as e:
            raise ImageLoadError(f"image file not found: {path!r}; check the path") from e
        except Image.DecompressionBombError as e:
            raise ImageLoadError(
                f"image file {path!r} is larger than PIL's safety limit ({e}); "
                "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
            ) from e
        except UnidentifiedImageError as e:
            raise ImageLoadError(
                f"image file {path!r} is not a {IMAGE_FORMATS_TEXT} image (the formats this library decodes); "
                "convert it to PNG"
            ) from e
        except ImageLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails in whatever way its decoder does
            raise ImageLoadError(
                f"cannot read image file {path!r}: {type(e).__name__}: {e}; pass a readable "
                f"{IMAGE_FORMATS_TEXT} file or a PIL.Image"
            ) from e
    else:
        raise TypeError(
            f"image must be a PIL.Image.Image, str or os.PathLike, got {type(image).__name__}"
        )
    if rgb.width == 0 or rgb.height == 0:
        raise ImageLoadError(
            f"image {_describe(image)} has zero size ({rgb.width}x{rgb.height}); pass a non-empty image"
        )
    return rgb


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(
            f"image {name} has zero size ({image.width}x{image.height}); pass a non-empty image"
        )
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageLoadError(f"cannot convert image {name} of mode {image.mode!r} to RGB: {e}") from e


def _describe(image: ImageInput) -> str:
    return repr(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "(PIL.Image)"


def load_image(
    image: ImageInput,
    *,
    max_tiles: int | None = None,
    tile_size: int | None = None,
    use_thumbnail: bool | None = None,
    min_tiles: int | None = None,
    config: InternVLImageConfig | None = None,
) -> torch.Tensor:
    """One image -> pixel values ``[tiles, 3, tile_size, tile_size]`` (float32).

    Keyword arguments left as None come from ``config`` (defaults: 6 tiles of
    448 px plus thumbnail, ImageNet mean/std).
    """
    cfg = (config or InternVLImageConfig()).with_overrides(
        max_tiles=max_tiles, tile_size=tile_size, use_thumbnail=use_thumbnail, min_tiles=min_tiles
    )
    rgb = open_rgb(image)
    return tiles_to_tensor(dynamic_preprocess(rgb, cfg), cfg)


def load_images(images: None | ImageInput | Sequence[ImageInput], **kwargs: Any) -> list[torch.Tensor]:
    """None, one image or a list of images -> one pixel tensor per image.

    ``kwargs`` are ``load_image``'s keyword arguments.
    """
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    return [load_image(im, **kwargs) for im in images]


def image_token_block(num_tiles: int, tokens_per_tile: int = 256) -> str:
    """The text that stands for one image: ``<img>`` + ``<IMG_CONTEXT>`` x
    (num_tiles * tokens_per_tile) + ``</img>``."""
    if num_tiles < 1 or tokens_per_tile < 1:
        raise ValueError(
            f"num_tiles and tokens_per_tile must be >= 1, got {num_tiles} and {tokens_per_tile}"
        )
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_tiles * tokens_per_tile) + IMG_END_TOKEN


__all__ = [
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "IMG_CONTEXT_TOKEN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoadError",
    "IMAGE_FORMATS",
    "open_image",
    "InternVLImageConfig",
    "candidate_grids",
    "closest_tile_grid",
    "num_tiles",
    "dynamic_preprocess",
    "tiles_to_tensor",
    "open_rgb",
    "load_image",
    "load_images",
    "image_token_block",
]
