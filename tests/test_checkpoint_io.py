"""Checkpoint I/O paths that the parity suites do not reach: old key spellings (gamma/beta), the
`legacy_output` switch of the feature getters, and a hub id fetched over HTTP from a local stand-in
of the Hugging Face hub (then found again offline, in the cache)."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_tiny
from blip2 import Blip2ForConditionalGeneration, Blip2Model, Blip2QFormerModel, Blip2VisionModel

ROOT = Path(__file__).resolve().parents[1]


def _tiny_qformer(tmp_path: Path) -> tuple[Path, Blip2QFormerModel]:
    cfg = hf_tiny.blip2_config().qformer_config
    torch.manual_seed(0)
    m = hf_tiny.fan_in_init_(Blip2QFormerModel(cfg)).eval()
    m.save_pretrained(tmp_path / "new")
    return tmp_path / "new", m


def test_gamma_beta_keys_load_as_weight_bias(tmp_path):
    # Older BERT-derived files spell LayerNorm parameters gamma/beta; they must load as weight/bias.
    d, ref = _tiny_qformer(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        if "LayerNorm" in k or "layernorm" in k:
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        renamed[k] = v
    assert any(k.endswith(".gamma") for k in renamed) and any(k.endswith(".beta") for k in renamed)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((d / "config.json").read_text())
    save_file(renamed, str(old / "model.safetensors"), metadata={"format": "pt"})

    m = Blip2QFormerModel.from_pretrained(old)
    for (k, a), (k2, b) in zip(sorted(m.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_legacy_output_switches_between_tensor_and_object():
    torch.manual_seed(0)
    cfg = hf_tiny.blip2_config()
    px = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    m = hf_tiny.fan_in_init_(Blip2Model(cfg)).eval()
    with torch.no_grad():
        obj = m.get_qformer_features(px, legacy_output=True)
        t = m.get_qformer_features(px)  # the default: the tensor, as transformers 5.8.0 returns
        assert isinstance(t, torch.Tensor) and t.shape == (2, cfg.num_query_tokens, cfg.qformer_config.hidden_size)
        torch.testing.assert_close(obj.last_hidden_state, t)
        img = m.get_image_features(px, legacy_output=False)
        torch.testing.assert_close(m.get_image_features(px).last_hidden_state, img)

        g = hf_tiny.fan_in_init_(Blip2ForConditionalGeneration(cfg)).eval()
        proj = g.get_image_features(px, legacy_output=False)  # (B, Q, C_lm): the projected queries
        full = g.get_image_features(px)
        assert proj.shape == (2, cfg.num_query_tokens, cfg.text_config.hidden_size)
        torch.testing.assert_close(full.pooler_output, proj)
        torch.testing.assert_close(full.last_hidden_state, full.vision_outputs.last_hidden_state)
        assert full.qformer_outputs.last_hidden_state.shape == (2, cfg.num_query_tokens, cfg.qformer_config.hidden_size)


class _Hub(BaseHTTPRequestHandler):
    """The few hub endpoints snapshot_download reads: revision info, the file tree, and the files."""

    repo = "org/tiny-vision"
    files: dict[str, bytes] = {}
    sha = "0123456789abcdef0123456789abcdef01234567"
    hits: list[str] = []

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        path = self.path.split("?")[0]
        type(self).hits.append(path)
        api = f"/api/models/{self.repo}/"
        if path.startswith(api + "revision/"):
            info = {"id": self.repo, "sha": self.sha, "siblings": [{"rfilename": f} for f in self.files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if path.startswith(api + "tree/"):
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in self.files.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        if path.startswith(f"/{self.repo}/resolve/"):
            b = self.files.get(path.split("/", 5)[-1])
            if b is not None:
                return self._send(200, b, {"X-Repo-Commit": self.sha, "ETag": f'"{hashlib.sha1(b).hexdigest()}"'}, head)
        return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, head)


def _child(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_hub_id_downloads_from_the_endpoint_then_loads_offline_from_the_cache(tmp_path):
    torch.manual_seed(0)
    cfg = hf_tiny.blip2_config().vision_config
    src = tmp_path / "src"
    ref = hf_tiny.fan_in_init_(Blip2VisionModel(cfg)).eval()
    ref.save_pretrained(src)
    _Hub.files = {f.name: f.read_bytes() for f in src.iterdir()}
    _Hub.hits = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)  # a free port, loopback only
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cache = tmp_path / "hf-cache"
    px = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    torch.save(px, tmp_path / "px.pt")
    code = ("import sys, torch; from blip2 import Blip2VisionModel\n"
            "m = Blip2VisionModel.from_pretrained('org/tiny-vision')\n"
            f"y = m(torch.load({str(tmp_path / 'px.pt')!r})).last_hidden_state\n"
            f"torch.save(y, {str(tmp_path / 'y.pt')!r}); print(m.config.hidden_size)")
    try:
        r = _child(code, HF_ENDPOINT=f"http://127.0.0.1:{srv.server_address[1]}", HF_HUB_CACHE=str(cache))
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    assert any("/resolve/" in h for h in _Hub.hits)  # it really went over HTTP
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), ref(px).last_hidden_state)

    # the server is gone: offline, the same id is found in the cache
    r = _child(code, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert r.returncode == 0, r.stderr[-2000:]

    # an id that is neither cached nor reachable: one clear message naming it
    r = _child("from blip2 import Blip2VisionModel; Blip2VisionModel.from_pretrained('org/not-there')",
               HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert r.returncode != 0 and "cannot find model 'org/not-there'" in r.stderr
