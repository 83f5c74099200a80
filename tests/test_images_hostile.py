"""Hostile images (issue 17): the pixel budget, JPEG draft decoding, 16-bit grayscale, images with no
pixels, 1/2/4-channel arrays, and property tests of the image processor and loader: every input
gives a correct result or a one-line ValueError / TypeError raised by blip2, never a traceback from
inside numpy or PIL. Every image is generated here; nothing is a binary fixture."""

from __future__ import annotations

import io
import resource
import struct
import time
import traceback
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

import blip2
from blip2.processing import image_load
from blip2.processing.image import BlipImageProcessor, ImageLoadError, load_image

ENV = "BLIP2_MAX_IMAGE_PIXELS"
PACKAGE = Path(blip2.__file__).resolve().parent
SIZE = {"height": 8, "width": 8}


@pytest.fixture(autouse=True)
def _default_budget(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _big_png(path: Path, w: int, h: int) -> Path:
    """A valid w x h 8-bit grayscale PNG that compresses to almost nothing: a bomb for its size on disk."""
    z = zlib.compressobj(1)
    row = b"\x00" * (w + 1)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _smooth(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 gradients: JPEG-friendly, so draft decoding can be compared with a full one."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)],
                    -1).astype(np.uint8)


def _pv(images, **kw):
    return BlipImageProcessor(size=SIZE, **kw)(images, return_tensors="pt")["pixel_values"]


def _assert_blip2_error(e: BaseException):
    """One line, and raised by blip2's own code, not from deep inside numpy, PIL or torch."""
    assert isinstance(e, (ValueError, TypeError)), repr(e)
    assert "\n" not in str(e) and str(e), repr(e)
    where = Path(traceback.extract_tb(e.__traceback__)[-1].filename).resolve()
    assert PACKAGE in where.parents, f"{type(e).__name__} raised in {where}: {e}"


# ----------------------------------------------------------------------------- the pixel budget
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # from the test's own Image.open
def test_big_png_is_refused_from_its_header(tmp_path, monkeypatch):
    p = _big_png(tmp_path / "bomb.png", 12000, 12000)
    assert p.stat().st_size < 1_000_000  # small on disk, and under Pillow's own bomb limit
    assert 12000 * 12000 < 2 * Image.MAX_IMAGE_PIXELS
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for call in (lambda: load_image(p), lambda: load_image(str(p)), lambda: BlipImageProcessor()([p, p, p, p]),
                 lambda: BlipImageProcessor()(Image.open(p))):  # a lazily opened image too
        with pytest.raises(ImageLoadError) as e:
            call()
        msg = str(e.value)
        assert str(p) in msg or "given as a PIL image" in msg, msg
        assert "12000x12000" in msg and "40,000,000" in msg and ENV in msg and "max_pixels" in msg, msg
        assert "\n" not in msg
    assert time.perf_counter() - t0 < 2.0
    assert decoded == []  # nothing was decoded: the header said enough
    small = tmp_path / "small.png"
    Image.new("L", (30, 20)).save(small)
    load_image(small)
    assert set(decoded) == {(30, 20)}  # the spy does see a decode
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000  # KiB: far from the 2.2 GB of a decode


def test_budget_env_variable_and_argument(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    Image.fromarray(_smooth(100, 100)).save(p)  # 10,000 pixels
    assert image_load.max_image_pixels() == image_load.DEFAULT_MAX_IMAGE_PIXELS == 40_000_000
    assert load_image(p).size == (100, 100)
    monkeypatch.setenv(ENV, "5000")
    assert image_load.max_image_pixels() == 5000
    with pytest.raises(ImageLoadError, match="5,000") as e:
        load_image(p)
    assert str(p) in str(e.value) and "100x100" in str(e.value)
    with pytest.raises(ImageLoadError, match=ENV):
        _pv(str(p))  # the processor opens paths with the same budget
    with pytest.raises(ImageLoadError):
        _pv(Image.open(p))  # not decoded yet: refused before it is
    assert load_image(p, max_pixels=10_000).size == (100, 100)  # the argument wins over the variable
    with pytest.raises(ImageLoadError):
        load_image(p, max_pixels=9_999)
    decoded = Image.open(p)
    decoded.load()
    assert _pv(decoded).shape == (1, 3, 8, 8)  # already in memory: nothing left to protect
    assert _pv(_smooth(100, 100)).shape == (1, 3, 8, 8)  # arrays likewise
    monkeypatch.setenv(ENV, " 20_000 ")
    assert load_image(p).size == (100, 100)
    for bad in ("abc", "0", "-5", "1.5e6"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            load_image(p)
    monkeypatch.delenv(ENV)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels"):
            load_image(p, max_pixels=bad)


# ----------------------------------------------------------------------------- JPEG draft decoding
def test_jpeg_draft_decoding(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(_smooth(1200, 1600)).save(p, quality=95)
    assert load_image(p).size == (1600, 1200)  # off by default: a full decode, as the reference
    drafted = load_image(p, draft_size=(384, 384))
    assert drafted.size == (800, 600)  # the largest of 1/2, 1/4, 1/8 that keeps >= 384 on both sides
    assert load_image(p, draft_size=1000).size == (1600, 1200)  # not 2x larger: no draft
    full = np.asarray(load_image(p).resize((384, 384), Image.Resampling.BICUBIC), np.float32)
    small = np.asarray(drafted.resize((384, 384), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(full - small).mean() < 1.0 and np.abs(full - small).max() <= 16  # close, not equal
    # over the budget: decoded at the smallest scale that fits rather than refused
    assert load_image(p, max_pixels=500_000).size == (800, 600)
    assert load_image(p, max_pixels=100_000).size == (200, 150)
    with pytest.raises(ImageLoadError, match="200x150"):
        load_image(p, max_pixels=10_000)  # even 1/8 is too big
    png = tmp_path / "big.png"
    Image.fromarray(_smooth(1200, 1600)).save(png)
    with pytest.raises(ImageLoadError, match="1600x1200"):
        load_image(png, max_pixels=500_000)  # no draft decoding for PNG
    assert load_image(png, draft_size=(384, 384)).size == (1600, 1200)
    with pytest.raises(ValueError, match="draft_size"):
        load_image(p, draft_size=(0, 5))


def test_jpeg_draft_follows_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated by 90 degrees
    p = tmp_path / "rot.jpg"
    Image.fromarray(_smooth(1200, 1600)).save(p, exif=exif)
    assert load_image(p).size == (1200, 1600)
    assert load_image(p, draft_size=(100, 400)).size == (300, 400)  # asked of the upright image


def test_processor_never_drafts_by_itself(tmp_path):
    """Under the budget a JPEG path gives transformers' numbers exactly, however large against the target."""
    hf = pytest.importorskip("transformers")
    p = tmp_path / "big.jpg"
    Image.fromarray(_smooth(300, 400)).save(p)
    ours = BlipImageProcessor(size=SIZE)(str(p), return_tensors="pt")["pixel_values"]
    ref = hf.BlipImageProcessorPil(size=SIZE)(str(p), return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- high bit depth
def _gray16(values: np.ndarray, mode: str = "I;16") -> Image.Image:
    big_endian = mode == "I;16B"
    return Image.frombytes(mode, values.shape[::-1], values.astype(">u2" if big_endian else "<u2").tobytes())


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_file_is_mid_grey(tmp_path, fmt):
    p = tmp_path / f"grey16.{fmt.lower()}"
    _gray16(np.full((30, 40), 32896)).save(p, format=fmt)  # 128 * 257: mid-grey in 16 bits
    assert Image.open(p).mode.startswith("I")
    rgb = np.asarray(load_image(p))
    assert rgb.shape == (30, 40, 3) and (rgb == 128).all()  # PIL's convert("RGB") gives 255: white
    want = _pv(Image.new("RGB", (40, 30), (128, 128, 128)))
    assert torch.equal(_pv(str(p)), want)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16bit_gradient_scales_to_8bit(mode):
    k = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint32)
    v = k * 257  # the 8-bit value k, widened to 16 bits
    im = Image.fromarray(v.astype(np.int32), "I") if mode == "I" else _gray16(v, mode)
    assert im.mode == mode
    eight = Image.fromarray(k.astype(np.uint8), "L")
    assert np.array_equal(np.asarray(load_image(im)), np.asarray(eight.convert("RGB")))
    assert torch.equal(_pv(im), _pv(eight))  # same pixel_values as the 8-bit image


def test_wide_int_and_float_modes():
    k = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.int32)
    same = [Image.fromarray(k, "I"),  # already in [0, 255]: as PIL (and transformers) convert it
            Image.fromarray(k * 3 - 100, "I"),  # negative: PIL's clipping, as transformers
            Image.fromarray(k.astype(np.float32) * 1.2, "F")]  # floats beyond [0, 1]: PIL's conversion
    for im in same:
        assert np.array_equal(np.asarray(load_image(im)), np.asarray(im.convert("RGB"))), im.mode
    unit = Image.fromarray(k.astype(np.float32) / 255, "F")  # floats in [0, 1], as the processor reads arrays
    assert np.array_equal(np.asarray(load_image(unit)), np.stack([k] * 3, -1).astype(np.uint8))


# ----------------------------------------------------------------------------- no pixels
@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16", "P"])
def test_pil_image_without_pixels_is_an_error(size, mode):
    im = Image.new(mode, size)
    for call in (lambda: load_image(im), lambda: _pv(im), lambda: _pv([Image.new("RGB", (4, 4)), im])):
        with pytest.raises(ImageLoadError, match="empty") as e:
            call()
        _assert_blip2_error(e.value)
        assert f"{size[0]}x{size[1]}" in str(e.value)


@pytest.mark.parametrize("shape", [(0, 0), (0, 7), (0, 0, 3), (3, 0, 0), (4, 0, 3), (1, 5, 0), (0, 4, 4, 3)])
def test_array_without_pixels_is_an_error(shape):
    for a in (np.zeros(shape, np.uint8), torch.zeros(shape)):
        with pytest.raises(ValueError, match="empty") as e:
            _pv(a)
        _assert_blip2_error(e.value)


# ----------------------------------------------------------------------------- 1, 2 and 4 channels
def test_rgba_la_and_gray_arrays_match_pil_modes():
    rgb = _smooth(20, 30)
    alpha = np.arange(600, dtype=np.uint8).reshape(20, 30)
    rgba = np.dstack([rgb, alpha])
    gray = rgb[..., 0].copy()
    la = np.dstack([gray, alpha])
    cases = [(rgba, Image.fromarray(rgba, "RGBA")), (la, Image.fromarray(la, "LA")),
             (gray, Image.fromarray(gray, "L")), (gray[..., None], Image.fromarray(gray, "L")),
             (np.ascontiguousarray(rgba.transpose(2, 0, 1)), Image.fromarray(rgba, "RGBA")),  # (4, H, W)
             (torch.from_numpy(rgba), Image.fromarray(rgba, "RGBA")),
             (rgba.astype(np.float32) / 255, rgb.astype(np.float32) / 255),
             (np.stack([rgba, rgba]), [Image.fromarray(rgba, "RGBA")] * 2)]
    for a, pil in cases:
        assert torch.allclose(_pv(a), _pv(pil), atol=1e-6, rtol=0), getattr(a, "shape", None)
    # channels-first RGB keeps working, and gives what channels-last gives
    assert torch.equal(_pv(np.ascontiguousarray(rgb.transpose(2, 0, 1))), _pv(rgb))
    assert torch.equal(_pv(rgb), _pv(Image.fromarray(rgb)))
    # without RGB conversion the extra channels stay, and normalisation says why it cannot go on
    with pytest.raises(ValueError, match="4 channels") as e:
        _pv(rgba, do_convert_rgb=False)
    _assert_blip2_error(e.value)
    assert _pv(rgba, do_convert_rgb=False, do_normalize=False).shape == (1, 4, 8, 8)


def test_explicit_channel_format():
    def pv(a, fmt=None):
        return BlipImageProcessor(size=SIZE)(a, return_tensors="pt", input_data_format=fmt)["pixel_values"]

    rgba = np.dstack([_smooth(20, 30), np.full((20, 30), 9, np.uint8)])
    want = pv(rgba)
    assert torch.equal(pv(rgba, "channels_last"), want)
    assert torch.equal(pv(np.ascontiguousarray(rgba.transpose(2, 0, 1)), "channels_first"), want)
    gray = rgba[..., 0]
    assert torch.equal(pv(gray, "channels_last"), pv(gray))  # 2-d: no channel axis to move
    for bad, fmt in [(rgba, "sideways"), (np.zeros((20, 30, 7), np.uint8), "channels_last"),
                     (rgba, "channels_first")]:  # 20 channels
        with pytest.raises(ValueError) as e:
            pv(bad, fmt)
        _assert_blip2_error(e.value)


# ----------------------------------------------------------------------------- property tests
DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.float16, np.bool_]


@st.composite
def _arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    h, w = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    c = draw(st.integers(0, 5))
    layout = draw(st.sampled_from(["2d", "last", "first", "batch"]))
    shape = {"2d": (h, w), "last": (h, w, c), "first": (c, h, w), "batch": (draw(st.integers(0, 2)), h, w, c)}[layout]
    if dtype.kind == "f":
        lo, hi = draw(st.sampled_from([(0.0, 1.0), (0.0, 255.0), (-2.0, 300.0), (-2.0**100, 2.0**100)]))
        big = 2.0**15 if dtype == np.float16 else 2.0**100  # exactly representable in the width
        elements = st.floats(max(lo, -big), min(hi, big), width=dtype.itemsize * 8, allow_nan=False,
                             allow_subnormal=False)  # the trainer sets flush-to-zero process-wide
        elements = st.one_of(elements, st.sampled_from([np.nan, np.inf, 0.5])) if draw(st.booleans()) else elements
    elif dtype.kind == "b":
        elements = st.booleans()
    else:
        info = np.iinfo(dtype)
        elements = st.integers(*draw(st.sampled_from([(0, 255), (max(info.min, -300), min(info.max, 70000))])))
    a = draw(hnp.arrays(dtype, shape, elements=elements))
    return torch.from_numpy(a) if draw(st.booleans()) and dtype != np.uint16 else a


def _check(images, n_expected=None):
    """A correct result or a clear error from blip2 itself; returns the result or None."""
    try:
        out = _pv(images)
    except (ValueError, TypeError) as e:
        _assert_blip2_error(e)
        return None
    except Exception as e:  # pragma: no cover - the failure this test looks for
        pytest.fail(f"{type(e).__name__} from inside: {e}\n{''.join(traceback.format_tb(e.__traceback__))}")
    assert out.dtype == torch.float32 and out.shape[1:] == (3, 8, 8) and torch.isfinite(out).all()
    if n_expected is not None:
        assert out.shape[0] == n_expected
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_arrays())
def test_processor_arrays_property(a):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from casts of NaN or huge values either
        _check(a, a.shape[0] if a.ndim == 4 else 1)


@settings(max_examples=60, deadline=None)
@given(a=_arrays())
def test_processor_arrays_agree_with_reference(a):
    """Wherever transformers gives a result for a non-empty array, ours is the same."""
    hf = pytest.importorskip("transformers")
    a = a.numpy() if torch.is_tensor(a) else a
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = hf.BlipImageProcessorPil(size=SIZE)(a, return_tensors="pt")["pixel_values"]
    except Exception:
        return  # the reference refuses: we may refuse too, or accept (1, 2 and 4 channels)
    if a.size == 0:
        return  # the reference returns black; we refuse
    ours = _check(a)
    assert ours is not None and torch.allclose(ours, ref, atol=1e-6, rtol=0)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "I", "I;16",
         "I;16B", "I;16L", "F"]


@settings(max_examples=120, deadline=None)
@given(mode=st.sampled_from(MODES), w=st.integers(0, 6), h=st.integers(0, 6), data=st.data())
def test_processor_pil_modes_property(mode, w, h, data):
    im = Image.new(mode, (w, h))
    if w and h:
        n = len(im.tobytes())
        im = Image.frombytes(mode, (w, h), data.draw(st.binary(min_size=n, max_size=n)))
    if _check(im, 1) is None:
        assert w == 0 or h == 0  # only an empty image is refused
    if w and h:
        assert load_image(im).mode == "RGB" and load_image(im).size == (w, h)


def _sample_files() -> list[bytes]:
    out = []
    for fmt, mode in [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "I;16"),
                      ("WEBP", "RGBA"), ("PNG", "I;16")]:
        buf = io.BytesIO()
        im = Image.fromarray(_smooth(12, 16)).convert(mode) if not mode.startswith("I") else _gray16(
            np.arange(192).reshape(12, 16) * 300)
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SAMPLES = _sample_files()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(i=st.integers(0, len(SAMPLES) - 1), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                         max_size=6), cut=st.integers(0, 10**6))
def test_damaged_files_property(tmp_path_factory, i, edits, cut):
    """Bytes changed and cut anywhere: an RGB image or an ImageLoadError, nothing else."""
    data = bytearray(SAMPLES[i])
    for pos, val in edits:
        data[pos % len(data)] = val
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    p = tmp_path_factory.mktemp("dmg") / "x.img"
    p.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = load_image(p, max_pixels=1_000_000)
    except ImageLoadError as e:
        _assert_blip2_error(e)
        assert str(p) in str(e)
        return
    assert im.mode == "RGB" and im.width * im.height > 0
