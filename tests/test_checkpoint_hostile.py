"""Hostile checkpoints: the safetensors header reader under random headers (hypothesis), a corpus of
damaged checkpoints generated here, shard indexes that point outside the folder, tensors of the
wrong dtype class, a legacy .bin, garbage tokenizer.json, and the docs' load_in_8bit example."""

import json
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import blip2
from blip2.checkpoint.header import DTYPE_SIZES, HeaderError, read_header
from blip2.checkpoint.reader import CheckpointError

import hf_tiny

# --- the header reader, property-based -------------------------------------------------------------

_entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.text(max_size=4), st.integers()),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.integers(), st.none()),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 300), min_size=0, max_size=3),
                              st.tuples(st.floats(allow_nan=True), st.integers()).map(list), st.text(max_size=3)),
})
_header = st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(_entry, st.integers(), st.text(max_size=4)), max_size=4),
    st.dictionaries(st.just("__metadata__"), st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
    st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5), st.none(),
)


def _consistent_entry(name, e, data_len):
    """An entry read_header may return: any other is a lie it must refuse."""
    b, end = e["data_offsets"]
    n = 1
    for d in e["shape"]:
        n *= d
    return 0 <= b <= end <= data_len and end - b == n * DTYPE_SIZES[e["dtype"]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=_header,
    raw=st.one_of(st.none(), st.binary(max_size=40), st.just(b"{" * 3000), st.just(b'{"a": 1' + b"9" * 5000 + b"}")),
    data_len=st.integers(0, 300),
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.just(2**60)),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_read_header_returns_consistent_entries_or_a_one_line_header_error(header, raw, data_len, length, cut):
    body = raw if raw is not None else json.dumps(header).encode()
    blob = struct.pack("<Q", len(body) if length is None else length) + body + bytes(data_len)
    if cut is not None:
        blob = blob[:cut]
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "model.safetensors"
        p.write_bytes(blob)
        try:
            entries, start = read_header(p)
        except HeaderError as e:
            assert str(p) in str(e) and "\n" not in str(e)
            return
    assert start == 8 + len(body) and start <= len(blob)
    for name, e in entries.items():
        assert name != "__metadata__" and _consistent_entry(name, e, len(blob) - start), (name, e)


# --- a tiny checkpoint, then a corpus of damaged copies --------------------------------------------

KEY = "post_layernorm.weight"  # a float parameter of Blip2VisionModel


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision")
    hf_tiny.save_hf("Blip2VisionModel", hf_tiny.blip2_config().vision_config, d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _sharded(src: Path, dst: Path) -> Path:
    m = blip2.Blip2VisionModel.from_pretrained(src)
    m.save_pretrained(dst, max_shard_size=20_000)
    assert (dst / "model.safetensors.index.json").is_file()
    return dst


def _truncated(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return f


def _huge_length(d):
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**60) + f.read_bytes()[8:])
    return f


def _not_json(d):
    f = d / "model.safetensors"
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    f.write_bytes(b[:8] + b"\xff" * n + b[8 + n:])
    return f


def _wrong_dtype(d):
    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd[KEY] = sd[KEY].view(torch.int32)  # same bytes, header says I32
    save_file(sd, str(f), metadata={"format": "pt"})
    return f


def _empty(d):
    f = d / "model.safetensors"
    f.write_bytes(b"")
    return f


def _shard_outside(d):
    idx = d / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = d.parent / f"{d.name}-elsewhere"
    outside.mkdir()
    (outside / first).write_bytes((d / first).read_bytes())
    index["weight_map"] = {k: (f"../{outside.name}/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    idx.write_text(json.dumps(index))
    return idx


def _missing_shard(d):
    idx = d / "model.safetensors.index.json"
    (d / sorted(set(json.loads(idx.read_text())["weight_map"].values()))[-1]).unlink()
    return idx


DAMAGE = {"truncated": _truncated, "header length 2^60": _huge_length, "header not JSON": _not_json,
          "I32 for a float": _wrong_dtype, "empty file": _empty}
SHARDED_DAMAGE = {"shard outside the folder": _shard_outside, "index with a missing shard": _missing_shard}


def _assert_refused(d, named: Path):
    with pytest.raises(ValueError) as e:
        blip2.Blip2VisionModel.from_pretrained(d)
    assert isinstance(e.value, (CheckpointError, HeaderError)), repr(e.value)
    msg = str(e.value)
    assert "\n" not in msg and named.name in msg, msg


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_in_one_line(ckpt, tmp_path, damage):
    d = _copy(ckpt, tmp_path / "c")
    _assert_refused(d, DAMAGE[damage](d))


@pytest.mark.parametrize("damage", sorted(SHARDED_DAMAGE))
def test_damaged_sharded_checkpoint_is_refused_in_one_line(ckpt, tmp_path, damage):
    d = _sharded(ckpt, tmp_path / "c")
    _assert_refused(d, SHARDED_DAMAGE[damage](d))


def test_wrong_dtype_names_the_key_and_file(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    _wrong_dtype(d)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {KEY} is stored as torch\.int32"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_float_to_another_float_is_the_cast(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    sd = load_file(str(d / "model.safetensors"))
    sd[KEY] = sd[KEY].to(torch.bfloat16)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = blip2.Blip2VisionModel.from_pretrained(d, dtype=torch.float32)
    assert torch.equal(m.post_layernorm.weight, sd[KEY].float())


def test_legacy_bin_loads(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "c")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    m = blip2.Blip2VisionModel.from_pretrained(d)
    ours = m.state_dict()
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k


# --- shard indexes ----------------------------------------------------------------------------------

def _set_shard(d, name):
    idx = d / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    k = next(iter(index["weight_map"]))
    index["weight_map"][k] = name
    idx.write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/model.safetensors", "sub/../../x.safetensors"])
def test_shard_paths_outside_the_folder_are_refused(ckpt, tmp_path, name):
    d = _sharded(ckpt, tmp_path / "c")
    _set_shard(d, name)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: shard .* outside the checkpoint folder"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_shard_symlink_out_of_the_folder_is_refused(ckpt, tmp_path):
    d = _sharded(ckpt, tmp_path / "c")
    first = sorted(p.name for p in d.glob("model-*.safetensors"))[0]
    (tmp_path / "elsewhere.safetensors").write_bytes((d / first).read_bytes())
    (d / first).unlink()
    (d / first).symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=rf"shard '{first}' links to .*outside the checkpoint folder"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_shard_symlink_inside_the_folder_loads(ckpt, tmp_path):
    d = _sharded(ckpt, tmp_path / "c")
    first = sorted(p.name for p in d.glob("model-*.safetensors"))[0]
    (d / "blobs").mkdir()
    (d / first).rename(d / "blobs" / "abc")
    (d / first).symlink_to(Path("blobs") / "abc")
    blip2.Blip2VisionModel.from_pretrained(d)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": [1]}',
                                  '{"weight_map": {"a": 3}}', '{"weight_map": {"a": null}}'])
def test_bad_index_is_one_line(ckpt, tmp_path, text):
    d = _sharded(ckpt, tmp_path / "c")
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        blip2.Blip2VisionModel.from_pretrained(d)
    assert "model.safetensors.index.json is not a valid shard index" in str(e.value) and "\n" not in str(e.value)


# --- tokenizer.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", '{"model": 5}', '{"model": {"type": "BPE", "vocab": 3}}',
                                  '{"added_tokens": [7]}'])
def test_garbage_tokenizer_json_is_one_line(tmp_path, text):
    d = _copy(blip2.demo_checkpoint(), tmp_path / "t")
    (d / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError) as e:
        blip2.AutoTokenizer.from_pretrained(d)
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value), repr(e.value)


# --- the docs' int8 example -------------------------------------------------------------------------

def _docs_example(**kw):
    """The seed docs' example, device_map dropped, on the demo checkpoint and a shipped image."""
    from PIL import Image
    from blip2.apps.demo.shipped import example_images

    d = blip2.demo_checkpoint()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = blip2.Blip2Processor.from_pretrained(d)
    model = blip2.Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.float16, **kw)
    image = Image.open(example_images()[0])
    inputs = processor(images=image, return_tensors="pt").to(device, torch.float16)
    generated_ids = model.generate(**inputs)
    return model, processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("kw,mode", [({"load_in_8bit": True}, "Int8Linear"), ({"load_in_4bit": True}, "Int4Linear"),
                                     ({"quantization_config": {"load_in_8bit": True}}, "Int8Linear")])
def test_load_in_8bit_is_our_int8(kw, mode):
    with pytest.warns(UserWarning, match="numerics differ from bitsandbytes"):
        model, text = _docs_example(**kw)
    assert any(type(m).__name__ == mode for m in model.language_model.modules())
    assert text  # a caption, through the quantized language model
    _, plain = _docs_example(quantize=mode[:4].lower())
    assert text == plain


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
@pytest.mark.parametrize("device_map", [{"": 0}, 0, "cuda", "cuda:1"])
def test_cuda_device_map_without_cuda_says_drop_it(ckpt, device_map):
    with pytest.raises(ValueError, match=r"no CUDA device; drop device_map"):
        blip2.Blip2VisionModel.from_pretrained(ckpt, device_map=device_map)


def test_device_map_auto_and_cpu(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dm in ("auto", {"": "cpu"}, "cpu"):
            blip2.Blip2VisionModel.from_pretrained(ckpt, device_map=dm)
