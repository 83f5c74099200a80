"""Images arriving in requests: `data:` base64 URLs always; http(s) URLs only with
--allow-remote-images (a fetch timeout and a byte cap); local paths and file: URLs never.

Decoding goes through the library's `_open`, which refuses decompression bombs and images over the
pixel budget from their header, before decoding; every failure is an `ImageError` (a 400)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass

from PIL import Image

from ...processing.image_load import ImageLoadError, _open

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.ASCII)


class ImageError(ValueError):
    """An image that cannot be used: the message says why (a 400 for the client)."""


@dataclass
class ImagePolicy:
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024  # encoded size, data: or downloaded
    max_pixels: int = 40_000_000
    fetch_timeout: float = 10.0


def fetch_image(url: str, policy: ImagePolicy, what: str = "image") -> Image.Image:
    """The RGB image `url` points to, or ImageError naming `what` (e.g. "messages[0].content[1]")."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"{what}: an image URL must be a non-empty string")
    if url.startswith("data:"):
        data = _data_bytes(url, policy, what)
        name = f"{what} (data URL)"
    elif url.lower().startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ImageError(f"{what}: http(s) image URLs are turned off on this server (start it with "
                             "--allow-remote-images); send the image as a data: URL instead")
        data = _download(url, policy, what)
        name = f"{what} ({url[:80]})"
    else:
        raise ImageError(f"{what}: only data: URLs (and http(s) URLs with --allow-remote-images) are accepted; "
                         "local file paths and file: URLs never are")
    try:
        return _open(io.BytesIO(data), name, policy.max_pixels)
    except ImageLoadError as e:
        raise ImageError(str(e)) from None


def _data_bytes(url: str, policy: ImagePolicy, what: str) -> bytes:
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise ImageError(f"{what}: a data URL must look like data:image/png;base64,<base64 data>")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"{what}: the data URL holds {mime}, not an image")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise ImageError(f"{what}: the image is over the {policy.max_bytes} byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what}: the data URL's base64 payload is malformed") from None


def _download(url: str, policy: ImagePolicy, what: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "blip2-serve"})
    try:
        with urllib.request.urlopen(req, timeout=policy.fetch_timeout) as r:  # noqa: S310 (http(s) only, checked)
            data = r.read(policy.max_bytes + 1)
    except Exception as e:  # URLError, timeouts, a bad port (http.client.InvalidURL), ...
        raise ImageError(f"{what}: cannot fetch {url[:80]}: {getattr(e, 'reason', e)}") from None
    if len(data) > policy.max_bytes:
        raise ImageError(f"{what}: the image at {url[:80]} is over the {policy.max_bytes} byte limit")
    return data
