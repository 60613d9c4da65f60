"""Client images for the reranking server: bounded, off the event loop, no view of the server's files.

An image is a ``data:`` URL, or -- only when the server was started with
``--image-root`` -- a path (or ``file://`` URL) naming a regular file under
that folder after every symlink is resolved.  Anything else about a local
path (missing, a directory, a FIFO or device, outside the root, not an
image) gets one and the same message, so a client learns nothing about the
server's files.  The header's width x height is checked before any pixel is
decoded; the decode runs in a small thread pool with a time limit, and the
server keeps the encoded bytes only: the pixels are decoded again when the
PRM reads the image, so waiting requests hold compressed data, not pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mmprm_infer.integrations.serve.errors import APIError
from mmprm_infer.vision import IMAGE_FORMATS_TEXT, open_image

__all__ = ["ClientImage", "ImageReader", "read_image"]

PATHS_OFF = ("local image paths are off on this server (it was started without --image-root); send the image "
             "as a data: URL (data:image/png;base64,...)")


def _not_an_image(url: str) -> APIError:
    # One message for every way a local path can fail: no existence oracle.
    return APIError(400, f"image {url[:200]!r} is not an image file under the server's image root; give the "
                         "path of a PNG/JPEG/... file under it, or send a data: URL", param="image_url")


@dataclass(frozen=True)
class ClientImage:
    """A checked image: its encoded bytes and how the policy gets it."""

    data: bytes
    policy_url: str  # the data URL sent to the policy (as the client sent it, or built from the file)
    size: tuple[int, int]

    def pil(self) -> Image.Image:
        """Lazy: Pillow decodes the pixels when the PRM converts the image, inside the scorer thread."""
        return open_image(io.BytesIO(self.data))


def read_image(url: str, image_root: str | None, max_pixels: int, max_bytes: int) -> ClientImage:
    """A data: URL or local path -> ClientImage; APIError(400) saying what is wrong.  Blocking: run it in a thread."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise APIError(400, "image data URLs must be base64: data:image/png;base64,<data>", param="image_url")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data URL holds invalid base64", param="image_url") from None
        return ClientImage(raw, url, _check_pixels(raw, "the image in a data URL", max_pixels)[0])
    if url.startswith(("http://", "https://")):
        raise APIError(400, "http(s) image URLs are not fetched by the reranking server; send the image as a "
                            "data: URL (base64)", param="image_url")
    if image_root is None:
        raise APIError(400, PATHS_OFF, param="image_url")
    raw = _read_under(url, image_root, max_bytes)
    try:
        size, fmt = _check_pixels(raw, "the image", max_pixels)
    except APIError as exc:
        if exc.code == "too_many_pixels":  # an image under the root: saying so tells nothing new
            raise
        raise _not_an_image(url) from None
    mime = Image.MIME.get(fmt or "", "image/png")
    return ClientImage(raw, f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}", size)


def _read_under(url: str, image_root: str, max_bytes: int) -> bytes:
    """The bytes of a regular file under image_root (symlinks resolved first); never opens a FIFO or device."""
    path = url[len("file://"):] if url.startswith("file://") else url
    try:
        real = os.path.realpath(os.path.join(image_root, path))  # relative paths are relative to the root
        if os.path.commonpath([real, image_root]) != image_root or not stat.S_ISREG(os.stat(real).st_mode):
            raise _not_an_image(url)
        # O_NONBLOCK: should the file become a FIFO after the stat, open() still returns; fstat then refuses it.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        raise _not_an_image(url) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise _not_an_image(url)
        return f.read(max_bytes + 1)[:max_bytes]


def _check_pixels(raw: bytes, what: str, max_pixels: int) -> tuple[tuple[int, int], str | None]:
    """Size and format from the header, the size checked against max_pixels before a full decode (which must
    succeed)."""
    try:
        with open_image(io.BytesIO(raw)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise APIError(400, f"{what} is {width}x{height} = {width * height} pixels, more than this server's "
                                    f"limit of {max_pixels} (--max-image-pixels); send a smaller image",
                               param="image_url", code="too_many_pixels")
            if width == 0 or height == 0:
                raise APIError(400, f"{what} has zero size ({width}x{height})", param="image_url")
            im.load()  # a truncated or corrupt image fails here, before the policy is asked
            fmt = im.format
    except APIError:
        raise
    except Image.DecompressionBombError as exc:
        raise APIError(400, f"{what} is larger than Pillow's decompression-bomb limit ({_quiet(exc)}); send a "
                            "smaller image", param="image_url", code="too_many_pixels") from None
    except UnidentifiedImageError:
        raise APIError(400, f"{what} is not a {IMAGE_FORMATS_TEXT} image, the formats this server decodes; "
                            "convert it to PNG", param="image_url") from None
    except Exception as exc:  # noqa: BLE001 - client bytes fail in whatever way their decoder does: a 400, not a 500
        raise APIError(400, f"cannot decode {what}: {type(exc).__name__}: {_quiet(exc)}", param="image_url") \
            from None
    return (width, height), fmt


def _quiet(exc: Exception) -> str:
    """A decoder's message without the server's memory addresses (``<_io.BytesIO object at 0x7f...>``)."""
    text = re.sub(r"<[^<>]*? at 0x[0-9a-fA-F]+>", "the image", str(exc))
    return re.sub(r"0x[0-9a-fA-F]{8,}", "0x...", text)[:300]


class ImageReader:
    """``read_image`` in a few worker threads with a time limit; the event loop never blocks on an image."""

    def __init__(self, image_root: str | None, max_pixels: int, max_bytes: int, workers: int, timeout_s: float):
        self.args = (image_root, max_pixels, max_bytes)
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mmprm-image")
        # One slot per worker, freed when the decode really ends (not when its wait times out), so the time
        # limit covers the decode itself and never the wait for a free worker.
        self.slots = asyncio.Semaphore(workers)

    async def read(self, url: str) -> ClientImage:
        await self.slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self.pool, read_image, url, *self.args)
        except BaseException:
            self.slots.release()
            raise
        future.add_done_callback(lambda _: self.slots.release())
        try:
            # shield: a timeout or a client going away stops the wait, not the thread (threads cannot be killed)
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(400, f"an image took longer than {self.timeout_s:g} s to decode (--image-timeout); send "
                                "a smaller or simpler image", param="image_url") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
