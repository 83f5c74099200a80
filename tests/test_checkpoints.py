"""Checkpoint loading: sharded / single / .bin files, cross-class loading, and clear errors for
checkpoints that do not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.checkpoint.pretrained import CheckpointError

import hf_tiny


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision")
    hf = hf_tiny.save_hf("Blip2VisionModel", hf_tiny.blip2_config().vision_config, d)
    return d, hf


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_weights(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "c")
    _edit_weights(d, lambda sd: sd.pop("post_layernorm.weight"))
    with pytest.raises(CheckpointError) as e:
        blip2.Blip2VisionModel.from_pretrained(d)
    msg = str(e.value)
    assert "missing" in msg and "post_layernorm.weight" in msg and "model.safetensors" in msg


def test_unexpected_tensor_is_named(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "c")
    _edit_weights(d, lambda sd: sd.__setitem__("encoder.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected .*encoder\.layers\.0\.extra\.weight"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_wrong_shape_is_named(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "c")
    _edit_weights(d, lambda sd: sd.__setitem__("post_layernorm.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"wrong shape .*post_layernorm\.bias: checkpoint \[5\], model \[32\]"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_config_of_another_architecture(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "c")
    (d / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 32}))
    with pytest.raises(ValueError, match="clip_vision_model"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_no_weights_names_the_directory(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_corrupt_file_is_named(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "c")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_missing_shard_is_named(vision_ckpt, tmp_path):
    m = blip2.Blip2VisionModel.from_pretrained(vision_ckpt[0])
    d = tmp_path / "sharded"
    m.save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_not_a_directory_and_offline_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        blip2.Blip2VisionModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        blip2.Blip2VisionModel.from_pretrained("nobody-has/this-model-xyz")


def test_sharded_roundtrip_and_transformers_reads_ours(vision_ckpt, tmp_path):
    d0, hf = vision_ckpt
    m = blip2.Blip2VisionModel.from_pretrained(d0)
    m.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf.state_dict())
    m2 = blip2.Blip2VisionModel.from_pretrained(tmp_path / "s")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    import transformers

    back = transformers.Blip2VisionModel.from_pretrained(str(tmp_path / "s")).eval()
    x = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        hf_tiny.assert_close(m(x).last_hidden_state, back(x).last_hidden_state, what="reloaded by transformers")


def test_pytorch_bin_weights_only(vision_ckpt, tmp_path):
    d = _copy(vision_ckpt[0], tmp_path / "b")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    m = blip2.Blip2VisionModel.from_pretrained(d)
    assert torch.equal(m.post_layernorm.weight, sd["post_layernorm.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        blip2.Blip2VisionModel.from_pretrained(d)


def test_dtype_auto_and_cast(vision_ckpt):
    m = blip2.Blip2VisionModel.from_pretrained(vision_ckpt[0])
    assert m.dtype == torch.float32
    m = blip2.Blip2VisionModel.from_pretrained(vision_ckpt[0], dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    with pytest.raises(ValueError, match="unknown dtype"):
        blip2.Blip2VisionModel.from_pretrained(vision_ckpt[0], dtype="float8")


def test_full_size_builds_on_meta_without_memory():
    """ViT-g + Q-Former at the documented defaults: parameter counts, no allocation."""
    import transformers

    cfg = blip2.Blip2Config()
    with torch.device("meta"):
        vis = blip2.Blip2VisionModel(cfg.vision_config)
        qf = blip2.Blip2QFormerModel(cfg.qformer_config)
        ret = blip2.Blip2ForImageTextRetrieval(blip2.Blip2Config(qformer_config={"use_qformer_text_input": True, "vocab_size": 30523}))
    assert all(p.is_meta for p in vis.parameters()) and all(p.is_meta for p in qf.parameters())
    n_vis = vis.num_parameters()
    # EVA ViT-g/14 with 39 blocks and the post layernorm: 985.9 M trained parameters, plus the
    # 39 x 1408 always-zero key-bias slots of the fused qkv bias that the reference stores.
    assert n_vis - 39 * 1408 == 985_897_344
    hcfg = transformers.Blip2Config()
    with torch.device("meta"):
        h_vis = transformers.Blip2VisionModel(hcfg.vision_config)
        h_qf = transformers.Blip2QFormerModel(hcfg.qformer_config)
        h_ret = transformers.Blip2ForImageTextRetrieval(
            transformers.Blip2Config(qformer_config={"use_qformer_text_input": True, "vocab_size": 30523})
        )
    assert n_vis == sum(p.numel() for p in h_vis.parameters())
    assert qf.num_parameters() == sum(p.numel() for p in h_qf.parameters())
    assert ret.num_parameters() == sum(p.numel() for p in h_ret.parameters())


def test_device_map_and_bitsandbytes_flags(vision_ckpt):
    m = blip2.Blip2VisionModel.from_pretrained(vision_ckpt[0], device_map={"": "cpu"})
    assert m.device.type == "cpu"
    with pytest.raises(NotImplementedError, match="bitsandbytes"):
        blip2.Blip2VisionModel.from_pretrained(vision_ckpt[0], load_in_8bit=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_reader_rows_and_metadata_match_the_tensors(vision_ckpt, tmp_path, fmt):
    """One reader for both formats: dtypes and shapes without reading data (safetensors: from the
    header), row blocks by file reads equal to the mmapped tensor."""
    from blip2.checkpoint.reader import Reader, checkpoint_files

    d = _copy(vision_ckpt[0], tmp_path / "r")
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layers.0.self_attn.qkv.weight"] = sd["encoder.layers.0.self_attn.qkv.weight"].bfloat16()
    if fmt == "pt":
        (d / "model.safetensors").unlink()
        torch.save(sd, d / "pytorch_model.bin")
    else:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    files, got_fmt = checkpoint_files(d)
    assert got_fmt == fmt
    r = Reader(files, got_fmt)
    assert set(r.keys()) == set(sd)
    for k, t in sd.items():
        assert r.shape(k) == tuple(t.shape) and r.dtype(k) == t.dtype and r.is_float(k) == t.is_floating_point()
        assert torch.equal(r.get(k), t) and not r.is_fresh(k)
    k = "encoder.layers.0.self_attn.qkv.weight"
    n = sd[k].shape[0]
    assert torch.equal(r.rows(k, 3, n - 2), sd[k][3:n - 2])
    reused = r.rows(k, 0, 4, reuse=True)
    assert torch.equal(reused, sd[k][:4])
    if fmt == "safetensors":  # read into the reader's buffer (a .bin is mmapped by torch.load: sliced)
        assert reused.untyped_storage().data_ptr() == r.buffer(1).data_ptr()
    r.close()


def test_generation_config_reloads_as_saved(tmp_path):
    """from_pretrained reads back the generation_config.json that save_pretrained wrote."""
    d = tmp_path / "g"
    hf_tiny.save_hf("Blip2ForConditionalGeneration", hf_tiny.blip2_config("opt"), d)
    m = blip2.Blip2ForConditionalGeneration.from_pretrained(d)
    m.generation_config.max_new_tokens, m.generation_config.num_beams = 7, 3
    m.save_pretrained(tmp_path / "s")
    again = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "s")
    assert (again.generation_config.max_new_tokens, again.generation_config.num_beams) == (7, 3)
    (tmp_path / "s" / "generation_config.json").unlink()  # none saved: the defaults from the config
    g = blip2.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "s").generation_config
    assert g.max_new_tokens != 7 and g.num_beams != 3
