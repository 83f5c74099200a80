"""Opening image files safely: a pixel budget checked from the header before anything is decoded,
JPEG draft decoding, and an RGB conversion that keeps 16-bit grayscale instead of clipping it.

Deliberate differences from transformers' `load_image` (which calls plain `convert("RGB")`):
- images over the pixel budget are refused (JPEGs are first decoded at 1/2, 1/4 or 1/8 scale when
  that brings them under it);
- 16-bit grayscale is scaled to 8 bits where PIL (and so transformers) clips it to white;
- an image with no pixels is an error.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

# 40 Mpx. A decoded image keeps 4 bytes a pixel (PIL stores RGB as RGBX) while the decoder's own
# mode and the processor's arrays pass through another ~8, so a batch of 4 at the budget peaks near
# 1 GB above the baseline (measured); today's 144 Mpx PNG alone takes 2.2 GB. It admits A4 scans at
# 600 dpi, 8K frames and most cameras; larger JPEGs (45 to 200 Mpx) still load, drafted to fit.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
MAX_PIXELS_ENV = "BLIP2_MAX_IMAGE_PIXELS"


class ImageLoadError(ValueError):
    """An image could not be read: missing, not an image, truncated, empty or over the pixel budget."""


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel budget: `max_pixels` if given, else $BLIP2_MAX_IMAGE_PIXELS, else the default."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            max_pixels = int(text)
        except ValueError:
            max_pixels = 0
        if max_pixels <= 0:
            raise ValueError(f"{MAX_PIXELS_ENV}={text!r} is not a positive whole number of pixels")
    elif isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    return int(max_pixels)


def check_pixels(size: tuple[int, int], name: str, limit: int | None) -> None:
    """Refuse an image with no pixels, or (when `limit` is given) one with more than `limit` pixels."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"image {name} is empty: it is {w}x{h} pixels")
    if limit is not None and w * h > limit:
        side = math.isqrt(limit)
        raise ImageLoadError(
            f"image {name} is {w}x{h} = {w * h:,} pixels, over the pixel budget of {limit:,} (a {side}x{side} "
            f"square); raise it with the environment variable {MAX_PIXELS_ENV}=<pixels> or "
            "load_image(..., max_pixels=<pixels>)")


def is_decoded(img: Image.Image) -> bool:
    # An ImageFile from Image.open keeps its `tile` list until load() has decoded it.
    return not getattr(img, "tile", None)


def to_rgb(img: Image.Image) -> Image.Image:
    """PIL's `convert("RGB")`, except for grayscale wider than 8 bits, which PIL clips at 255.

    I;16, I;16L, I;16B, I;16N: the top 8 bits (v >> 8, so 257 * k -> k).
    I (32-bit): values in [0, 255] are kept as PIL keeps them; when all lie in [0, 65535] and some
      are above 255 it is taken as 16-bit data (older Pillow opens 16-bit PNGs as I) and scaled the
      same way; anything else (negative values, wider data) is clipped by PIL, as in transformers.
    F: values all in [0, 1] are scaled by 255, the processor's rule for float arrays; otherwise PIL.
    """
    a = None
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint16) >> 8
    elif img.mode in ("I", "F"):
        lo, hi = img.getextrema()
        if img.mode == "I" and lo >= 0 and 255 < hi <= 65535:
            a = np.asarray(img) >> 8
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            a = np.rint(np.asarray(img) * 255)
    if a is not None:
        img = Image.fromarray(a.astype(np.uint8), "L")
    elif img.mode == "La":  # premultiplied alpha: PIL converts it to LA only
        img = img.convert("LA")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert: say which, from here
        raise ValueError(f"cannot convert a PIL image of mode {img.mode} to RGB: {e}") from None


def load_image(image: str | os.PathLike | Image.Image, timeout: float | None = 10.0, *,
               max_pixels: int | None = None, draft_size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open `image` (a path, an http(s) URL, a base64 data URL or a PIL image) as an RGB PIL image.

    EXIF orientation is applied, as in transformers' `load_image`. Unreadable files raise
    `ImageLoadError` naming the file and the reason. Files with more than `max_pixels` pixels
    (default: `max_image_pixels()`) are refused from their header, before decoding; a JPEG is first
    decoded at a reduced scale when that brings it under the budget. `draft_size` (width, height)
    asks for that reduced-scale JPEG decoding down to no less than this size, e.g. the processor's
    target size: much faster on large photos, but the pixels differ slightly from a full decode, so
    it is off by default. Pillow's own bomb limit (2 x `PIL.Image.MAX_IMAGE_PIXELS`) also applies.
    """
    if isinstance(image, Image.Image):
        try:
            limit = None if is_decoded(image) else max_image_pixels(max_pixels)  # in memory: nothing to protect
            check_pixels(image.size, "given as a PIL image", limit)
            return to_rgb(ImageOps.exif_transpose(image))
        except ImageLoadError:
            raise
        except Exception as e:  # a lazily opened image decodes here
            raise ImageLoadError(f"cannot read image given as a PIL image: {type(e).__name__}: {e}") from e
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"cannot load an image from an object of type {type(image).__name__}; "
                        "pass a file path, a URL or a PIL.Image.Image")
    src = os.fsdecode(image)
    if src.startswith(("http://", "https://")):
        import urllib.request  # stdlib; only needed for URLs

        try:
            with urllib.request.urlopen(src, timeout=timeout) as r:
                data = r.read()
        except Exception as e:
            raise ImageLoadError(f"cannot download image {src}: {e}") from e
        return _open(io.BytesIO(data), src, max_pixels, draft_size)
    if os.path.isfile(src):
        return _open(src, src, max_pixels, draft_size)
    if src.startswith("data:image/"):
        try:
            data = base64.b64decode(src.split(",", 1)[1])
        except Exception as e:
            raise ImageLoadError(f"cannot decode base64 data URL: {e}") from e
        return _open(io.BytesIO(data), "data URL", max_pixels, draft_size)
    if os.path.exists(src):
        raise ImageLoadError(f"cannot read image {src}: it is not a regular file")
    raise ImageLoadError(f"cannot read image {src}: no such file")


def _open(fp: str | io.BytesIO, name: str, max_pixels: int | None = None,
          draft_size: int | tuple[int, int] | None = None) -> Image.Image:
    """Decode `fp` (a path or a file object) as RGB; `name` is what error messages call it."""
    limit = max_image_pixels(max_pixels)
    if isinstance(draft_size, int):
        draft_size = (draft_size, draft_size)
    if draft_size is not None and (len(draft_size) != 2 or min(draft_size) <= 0):
        raise ValueError(f"draft_size must be a positive int or (width, height), got {draft_size!r}")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns; the budget below is what decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)  # lazy: reads the header only
            _draft(img, draft_size, limit)
            check_pixels(img.size, name, limit)
            img.load()  # force decoding so truncated data fails here, not later
            ImageOps.exif_transpose(img, in_place=True)  # not a copy: that would be 4 more bytes a pixel
            return to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"cannot read image {name}: decompression bomb refused by Pillow ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(f"cannot read image {name}: not an image file Pillow can identify") from e
    except Exception as e:  # plugins raise OSError, SyntaxError, EOFError, struct.error... on bad data
        bad = "truncated" in str(e).lower() or isinstance(e, SyntaxError)
        why = "file is truncated or corrupt" if bad else "unreadable"
        raise ImageLoadError(f"cannot read image {name}: {why} ({type(e).__name__}: {e})") from e


def _draft(img: Image.Image, draft_size: tuple[int, int] | None, limit: int) -> None:
    """Have libjpeg decode at 1/2, 1/4 or 1/8 scale: the strongest reduction that keeps the image at
    least `draft_size`, but at least the one that brings it under `limit` pixels. Other formats have
    no such decoding: they stay at full size (and are refused when over the limit)."""
    if img.format not in ("JPEG", "MPO"):
        return
    w, h = img.size
    scale = 1
    if draft_size is not None:
        dw, dh = draft_size
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
            dw, dh = dh, dw  # stored sideways: the size asked for is of the upright image
        fit = min(w // dw, h // dh)
        while scale < 8 and scale * 2 <= fit:
            scale *= 2
    while scale < 8 and -(-w // scale) * -(-h // scale) > limit:
        scale *= 2
    while scale > 1 and scale > min(w, h):
        scale //= 2
    if scale > 1:
        img.draft("RGB", (w // scale, h // scale))
