"""BLIP image preprocessing: RGB, PIL resize to a fixed square, rescale, CLIP normalisation.

Matches transformers' PIL backend (`BlipImageProcessorPil`) number for number: every step runs in
the same dtype and order (uint8 PIL resize, float64 rescale cast to float32, float32 normalise).
It differs on purpose only where the reference fails or is wrong:
- 16-bit grayscale PIL images are scaled to 8 bits, not clipped to white (see image_load.to_rgb);
- arrays with 1, 2 or 4 channels (H, W), (H, W, 1|2|4) become RGB as PIL's L, LA and RGBA would
  (the reference refuses them); an image with no pixels is an error (the reference returns black);
- files and not-yet-decoded PIL images over the pixel budget are refused (image_load.py).
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoint.hub import resolve_dir
from .encoding import BatchEncoding
from .image_load import check_pixels, is_decoded, max_image_pixels, to_rgb
from .image_load import ImageLoadError, _open, load_image  # noqa: F401  (imported from here by callers)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
# File suffixes taken as images when a folder is read (the CLI, the trainer): what Pillow decodes.
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

# Keys of preprocessor_config.json we interpret; everything else is kept verbatim for round trips.
_KNOWN = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
          "image_mean", "image_std", "do_convert_rgb")


def _size_dict(size: Any) -> dict:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):  # BLIP uses default_to_square=True
        d = {"height": size, "width": size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        d = {"height": int(size[0]), "width": int(size[1])}
    elif isinstance(size, dict) and set(size) in ({"height", "width"}, {"shortest_edge"}):
        d = dict(size)
    else:
        raise ValueError(f"size must be an int, (height, width) or a dict with 'height' and 'width' "
                         f"(or 'shortest_edge'); got {size!r}")
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in d.values()):
        raise ValueError(f"size must be positive whole numbers of pixels; got {size!r}")
    return {k: int(v) for k, v in d.items()}


def _infer_last(a: np.ndarray) -> bool:
    """True when a 3-d array is channels-last. The reference's rule first (1 or 3 channels, first
    wins), then what it refuses: 2 (LA) or 4 (RGBA) channels, last before first."""
    for last, counts in ((False, (1, 3)), (True, (1, 3)), (True, (2, 4)), (False, (2, 4))):
        if a.shape[2 if last else 0] in counts:
            return last
    raise ValueError(f"cannot tell where the channel axis is in an image of shape {a.shape}; "
                     "expected 1, 2, 3 or 4 channels first or last")


def _gray_alpha_to_rgb(a: np.ndarray) -> np.ndarray:
    """(C, H, W) with C in 1 (L), 2 (LA), 3, 4 (RGBA) -> (3, H, W) the way PIL's convert("RGB")
    treats those modes: gray is repeated, alpha is dropped (not composited)."""
    c = a.shape[0]
    if c in (1, 2):
        return np.repeat(a[:1], 3, axis=0)
    return a[:3] if c == 4 else a


def _pil_rescale_needed(a: np.ndarray) -> bool:
    # Same test as the reference before handing an array to PIL: integral values in [0, 255] stay,
    # [0, 1] floats are scaled to [0, 255] (and back afterwards), anything else cannot become uint8.
    if a.dtype in (np.uint8, np.bool_):
        return False
    lo, hi = a.min(), a.max()
    if lo >= 0 and hi <= 255:  # only here can astype(int) not overflow
        if a.dtype.kind in "iu" or np.allclose(a, a.astype(int)):
            return False
        if hi <= 1:
            return True
    raise ValueError(f"image values must be whole numbers in [0, 255] or floats in [0, 1] to be resized; "
                     f"got {a.dtype} values in [{lo}, {hi}]")


def _rescale(a: np.ndarray, scale: float) -> np.ndarray:
    return (a.astype(np.float64) * scale).astype(np.float32)  # upcast first, like the reference


def _resize(a: np.ndarray, h: int, w: int, resample: int) -> np.ndarray:
    """(C, H, W) any dtype -> (C, h, w) through a uint8 PIL image."""
    x = a.transpose(1, 2, 0)
    if x.shape[-1] == 1:
        x = x[..., 0]
    scaled = _pil_rescale_needed(x)
    if scaled:
        x = _rescale(x, 255)
    pil = Image.fromarray(x.astype(np.uint8, copy=False))
    y = np.array(pil.resize((w, h), resample=resample))
    if y.ndim == 2:
        y = y[..., None]
    y = y.transpose(2, 0, 1)
    return _rescale(y, 1 / 255) if scaled else y


class BlipImageProcessor:
    """Turns images into `pixel_values` (B, 3, H, W) the way BLIP-2 was trained and evaluated."""

    model_input_names = ["pixel_values"]

    def __init__(self, do_resize: bool = True, size: Any = None, resample: int = 3, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean: Any = None,
                 image_std: Any = None, do_convert_rgb: bool = True, **extra: Any):
        self.do_resize = do_resize
        self.size = _size_dict(size if size is not None else {"height": 384, "width": 384})
        self.resample = int(resample) if resample is not None else None
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = _floats(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = _floats(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.do_convert_rgb = do_convert_rgb
        self.extra = dict(extra)  # unknown config keys, written back unchanged by to_dict()

    # ---- config ----
    @classmethod
    def from_dict(cls, d: dict, **overrides: Any) -> "BlipImageProcessor":
        d = {**d, **overrides}
        return cls(**{k: v for k, v in d.items() if v is not None or k not in _KNOWN})

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **overrides: Any) -> "BlipImageProcessor":
        """Read `preprocessor_config.json`, or the `image_processor` entry of `processor_config.json`."""
        d = resolve_dir(str(path_or_id))
        f = d / IMAGE_PROCESSOR_NAME
        if f.is_file():
            return cls.from_dict(json.loads(f.read_text(encoding="utf-8")), **overrides)
        pf = d / "processor_config.json"
        if pf.is_file():
            pc = json.loads(pf.read_text(encoding="utf-8"))
            if isinstance(pc.get("image_processor"), dict):
                return cls.from_dict(pc["image_processor"], **overrides)
        raise FileNotFoundError(f"no image processor config in {d}: looked for {IMAGE_PROCESSOR_NAME} and "
                                "an 'image_processor' entry in processor_config.json")

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.setdefault("image_processor_type", "BlipImageProcessor")
        d.update(do_convert_rgb=self.do_convert_rgb, do_normalize=self.do_normalize, do_rescale=self.do_rescale,
                 do_resize=self.do_resize, image_mean=self.image_mean, image_std=self.image_std,
                 resample=self.resample, rescale_factor=self.rescale_factor, size=dict(self.size))
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / IMAGE_PROCESSOR_NAME).write_text(self.to_json_string(), encoding="utf-8")
        return out / IMAGE_PROCESSOR_NAME

    def __repr__(self) -> str:
        return f"BlipImageProcessor {self.to_json_string()}"

    # ---- processing ----
    def _flat(self, images: Any) -> list:
        """Accept one image or a (nested) list of them; paths are opened; 4-d arrays are batches."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("got an empty list of images")
            return [im for x in images for im in self._flat(x)]
        if isinstance(images, (str, os.PathLike)):
            return [load_image(images)]
        if isinstance(images, Image.Image):
            return [images]
        if isinstance(images, np.ndarray) or torch.is_tensor(images):
            if images.ndim == 4:
                if images.shape[0] == 0:
                    raise ValueError(f"got an empty batch of images (shape {tuple(images.shape)})")
                return list(images)
            if images.ndim in (2, 3):
                return [images]
            raise ValueError(f"an image array must have 2, 3 or 4 (batch) dimensions, got shape {tuple(images.shape)}")
        raise TypeError(f"unsupported image type {type(images).__module__}.{type(images).__name__}; pass a "
                        "PIL.Image.Image, a numpy array, a torch tensor, a file path, or a list of these")

    @staticmethod
    def _to_chw(image: Any, do_convert_rgb: bool, input_data_format: str | None) -> np.ndarray:
        if isinstance(image, Image.Image):
            # A lazily opened file decodes on first use: the same budget as load_image, before that.
            check_pixels(image.size, "given as a PIL image", None if is_decoded(image) else max_image_pixels())
            if do_convert_rgb:
                image = to_rgb(image)  # alpha is dropped, not composited, as the reference does
            a = np.array(image)
            return a.transpose(2, 0, 1) if a.ndim == 3 else a[None]  # (C, H, W)
        if torch.is_tensor(image):
            image = image.detach().cpu()
            a = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
        else:
            a = image
        if a.dtype.kind not in "biuf":
            raise TypeError(f"an image array must hold bool, integer or float values, got dtype {a.dtype}")
        if a.ndim == 2:
            a = a[None]
        elif input_data_format is None:
            a = a.transpose(2, 0, 1) if _infer_last(a) else a
        elif str(input_data_format) in ("channels_last", "ChannelDimension.LAST"):
            a = a.transpose(2, 0, 1)
        elif str(input_data_format) not in ("channels_first", "ChannelDimension.FIRST"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', "
                             f"got {input_data_format!r}")
        if a.shape[0] not in (1, 2, 3, 4):
            raise ValueError(f"an image must have 1, 2, 3 or 4 channels, got {a.shape[0]} (as (C, H, W): {a.shape})")
        check_pixels(a.shape[:0:-1], f"of shape {tuple(image.shape)}", None)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"image of shape {tuple(image.shape)} holds NaN or infinite values")
        return _gray_alpha_to_rgb(a) if do_convert_rgb else a  # (C, H, W)

    def preprocess(self, images: Any, return_tensors: str | None = None, *, do_resize: bool | None = None,
                   size: Any = None, resample: int | None = None, do_rescale: bool | None = None,
                   rescale_factor: float | None = None, do_normalize: bool | None = None, image_mean: Any = None,
                   image_std: Any = None, do_convert_rgb: bool | None = None,
                   input_data_format: str | None = None) -> BatchEncoding:
        do_resize = self.do_resize if do_resize is None else do_resize
        size = _size_dict(self.size if size is None else size)
        resample = self.resample if resample is None else int(resample)
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        mean = self.image_mean if image_mean is None else image_mean
        std = self.image_std if image_std is None else image_std
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        if resample is None:
            resample = Image.Resampling.BILINEAR

        out = []
        for image in self._flat(images):
            a = self._to_chw(image, do_convert_rgb, input_data_format)  # (C, H, W)
            if do_resize:
                a = _resize(a, *self._target_hw(a, size), resample)
            if do_rescale:
                a = _rescale(a, rescale_factor)
            if do_normalize:
                a = _normalize(a, mean, std)
            out.append(a)
        return BatchEncoding({"pixel_values": out}, tensor_type=return_tensors)

    __call__ = preprocess

    @staticmethod
    def _target_hw(a: np.ndarray, size: dict) -> tuple[int, int]:
        if "height" in size:
            return size["height"], size["width"]
        h, w = a.shape[-2:]  # shortest_edge: keep aspect ratio, truncate the long side like the reference
        s = size["shortest_edge"]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (new_long, s) if w <= h else (s, new_long)


def _normalize(a: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    c = a.shape[0]
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    mean = list(mean) if isinstance(mean, (list, tuple, np.ndarray)) else [mean] * c
    std = list(std) if isinstance(std, (list, tuple, np.ndarray)) else [std] * c
    if len(mean) != c or len(std) != c:
        raise ValueError(f"image has {c} channels but image_mean/image_std have {len(mean)}/{len(std)} entries; "
                         "pass RGB images (PIL images are converted when do_convert_rgb=True)")
    m = np.array(mean, dtype=a.dtype)[:, None, None]
    s = np.array(std, dtype=a.dtype)[:, None, None]
    return (a - m) / s


def _floats(x: Any) -> float | list[float]:
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else x
