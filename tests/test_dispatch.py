"""dispatch.py: choices measured once and cached per CPU, overridable, and every path they choose
between gives the same numbers (within one bf16 rounding) as a float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from blip2.backends.cpu import attention, build, dispatch, kernels, layout, linear
from blip2.backends.cpu.quant import Int4Linear, Int8Linear

needs_kernels = pytest.mark.skipif(not build.available(), reason="no C compiler or no AVX-512/AVX2 here")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty dispatch cache and no choices in memory (restored after)."""
    monkeypatch.setenv("BLIP2_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("BLIP2_DISPATCH", raising=False)
    saved = dict(dispatch._choices), dict(dispatch._timings), dispatch._loaded_key
    dispatch._choices.clear()
    dispatch._timings.clear()
    dispatch._loaded_key = None
    yield tmp_path / "dispatch"
    dispatch._choices.clear()
    dispatch._choices.update(saved[0])
    dispatch._timings.clear()
    dispatch._timings.update(saved[1])
    dispatch._loaded_key = saved[2]


def test_pick_prefers_torch_unless_clearly_faster():
    assert dispatch.pick({"torch": 1.0, "ours": 0.95}, "torch") == "torch"  # within the margin
    assert dispatch.pick({"torch": 1.0, "ours": 0.5}, "torch") == "ours"
    assert dispatch.pick({"torch": 0.4, "ours": 0.5}, "torch") == "torch"


def test_measure_returns_each_candidates_best_time():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1
        sum(range(20000))

    t = dispatch.measure({"a": a, "b": b}, reps=4, budget_s=10)
    assert calls == {"a": 5, "b": 5}  # one warm-up, then turns
    assert 0 <= t["a"] < t["b"]


def test_choices_are_measured_once_and_cached_per_cpu(fresh_cache, monkeypatch):
    runs = []
    monkeypatch.setitem(dispatch._MEASURE, "sdpa.bf16", lambda: (runs.append(1), ("fp32", {"bf16": 2.0, "fp32": 1.0}))[1])
    assert dispatch.choice("sdpa.bf16") == "fp32" and dispatch.choice("sdpa.bf16") == "fp32"
    assert len(runs) == 1
    files = list(fresh_cache.glob("*.json"))
    assert len(files) == 1 and files[0].stem == dispatch.cache_key()
    data = json.loads(files[0].read_text())
    assert data["choices"]["sdpa.bf16"] == "fp32" and data["timings"]["sdpa.bf16"] == {"bf16": 2.0, "fp32": 1.0}
    assert data["measured_on_threads"] == 1 and "torch" in data
    # a new process (memory cleared) reads the file instead of measuring
    dispatch._choices.clear()
    dispatch._loaded_key = None
    assert dispatch.choice("sdpa.bf16") == "fp32" and len(runs) == 1


def test_measured_on_one_thread_and_threads_restored(fresh_cache, monkeypatch):
    seen = []
    monkeypatch.setitem(dispatch._MEASURE, "sdpa.bf16", lambda: (seen.append(torch.get_num_threads()), ("bf16", {}))[1])
    n = torch.get_num_threads()
    dispatch.choice("sdpa.bf16")
    assert seen == [1] and torch.get_num_threads() == n


def test_a_damaged_cache_is_measured_again(fresh_cache, monkeypatch):
    fresh_cache.mkdir(parents=True)
    (fresh_cache / f"{dispatch.cache_key()}.json").write_text("{not json")
    monkeypatch.setitem(dispatch._MEASURE, "bf16.many", lambda: (64, {"bf16@64": 2.0, "fp32@64": 1.0}))
    assert dispatch.choice("bf16.many") == 64
    assert json.loads((fresh_cache / f"{dispatch.cache_key()}.json").read_text())["choices"]["bf16.many"] == 64


def _burn_every_cpu(seconds: float) -> None:
    """Other processes keep every CPU busy for `seconds` (this thread waits)."""
    code = f"import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < {seconds}: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.wait()


@pytest.mark.skipif(dispatch._busy_seconds() is None, reason="no /proc/stat here")
def test_others_share_sees_other_processes_not_this_thread():
    with dispatch.Others() as idle:
        time.sleep(0.3)
    with dispatch.Others() as mine:  # this thread's own work is not "others"
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            pass
    with dispatch.Others() as busy:
        _burn_every_cpu(0.6)
    assert busy.share > 0.5 and busy.share > idle.share + 0.3 and busy.share > mine.share + 0.3


@pytest.mark.skipif(dispatch._busy_seconds() is None, reason="no /proc/stat here")
def test_a_choice_measured_on_a_busy_machine_is_measured_again_once_quiet(fresh_cache, monkeypatch):
    runs = []

    def busy_measure():  # the measurement runs while other processes take every CPU
        runs.append(1)
        _burn_every_cpu(0.6)
        return 0, {"bf16@16": 1.0, "fp32@16": 2.0}

    monkeypatch.setitem(dispatch._MEASURE, "bf16.many", busy_measure)
    assert dispatch.choice("bf16.many") == 0 and len(runs) == 1
    data = json.loads((fresh_cache / f"{dispatch.cache_key()}.json").read_text())
    assert data["choices"]["bf16.many"] == 0 and data["provisional"]["bf16.many"] > dispatch.BUSY
    row = next(r for r in dispatch.report(measure=False) if r["op"] == "bf16.many")
    assert row["why"].startswith("measured while others used") and row["why"].endswith("provisional")

    def new_process():
        dispatch._choices.clear()
        dispatch._loaded_key = None
        dispatch._quiet = None

    # a later process on a still-busy machine keeps the provisional choice without measuring
    new_process()
    monkeypatch.setattr(dispatch, "quiet_now", lambda: False)
    assert dispatch.choice("bf16.many") == 0 and dispatch.choice("bf16.many") == 0 and len(runs) == 1
    # one on a quiet machine measures it again, once, and the new choice is final
    new_process()
    monkeypatch.setattr(dispatch, "quiet_now", lambda: True)
    monkeypatch.setitem(dispatch._MEASURE, "bf16.many", lambda: (runs.append(2), (64, {"bf16@64": 2.0, "fp32@64": 1.0}))[1])
    assert dispatch.choice("bf16.many") == 64 and dispatch.choice("bf16.many") == 64 and runs == [1, 2]
    data = json.loads((fresh_cache / f"{dispatch.cache_key()}.json").read_text())
    assert data["choices"]["bf16.many"] == 64 and "bf16.many" not in data["provisional"]


def test_environment_overrides_without_measuring(fresh_cache, monkeypatch):
    monkeypatch.setitem(dispatch._MEASURE, "bf16.many", lambda: pytest.fail("measured despite BLIP2_DISPATCH"))
    monkeypatch.setenv("BLIP2_DISPATCH", "bf16.one=linear, bf16.kernel_rows=7")
    assert dispatch.choice("bf16.one") == "linear" and dispatch.choice("bf16.kernel_rows") == 7
    monkeypatch.setenv("BLIP2_DISPATCH", "torch")
    assert {op: dispatch.choice(op) for op in dispatch.DEFAULTS} == dispatch.DEFAULTS
    rows = dispatch.report()
    assert {r["op"] for r in rows} == set(dispatch.DEFAULTS) and all(r["why"] == "BLIP2_DISPATCH" for r in rows)
    assert not fresh_cache.exists()  # nothing measured, nothing written


def test_report_measures_every_op_with_real_candidates(fresh_cache):
    rows = {r["op"]: r for r in dispatch.report()}
    assert set(rows) == {"bf16.one", "bf16.many", "bf16.dot", "bf16.kernel_rows", "int8.kernel_rows", "sdpa.bf16", "sdpa.one", "int8.one", "int4.one"}
    assert rows["bf16.many"]["choice"] in (0, 16, 32, 64, 128, 256) and {"bf16@256", "fp32@256"} <= set(rows["bf16.many"]["ms"])
    assert rows["bf16.one"]["choice"] in rows["bf16.one"]["ms"]
    assert all(v > 0 for r in rows.values() for v in r["ms"].values())
    if build.available():
        assert all("kernel" in rows[op]["ms"] for op in ("bf16.one", "int8.one", "int4.one", "sdpa.one"))
        assert rows["bf16.kernel_rows"]["choice"] >= 1


@pytest.mark.parametrize("many", ["bf16", "fp32"])
@pytest.mark.parametrize("rows", [1, 40])
def test_attention_paths_agree(many, rows):  # many: sdpa.bf16's choice
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(2, 4, rows, 32, generator=g).bfloat16()
    k, v = (torch.randn(2, 4, 40, 32, generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    sdp = attention.CpuScaledDotProduct()
    bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    for one in ("sdpa", "fp32", "kernel"):
        with dispatch.force(**{"sdpa.bf16": many, "sdpa.one": one}):
            y, _ = sdp(q, k, v, mask)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
        if one != "kernel":  # a decode step takes sdpa.one's path; other calls take sdpa.bf16's
            path = one if rows == 1 else ("sdpa" if many == "bf16" else "fp32")
            assert torch.equal(y, bf16 if path == "sdpa" else fp32), (one, many, rows)


def _layer(kind: str) -> torch.nn.Module:
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(128, generator=g) * 0.1)
    if kind == "int8":
        return Int8Linear.from_linear(lin.bfloat16())
    if kind == "int4":
        return Int4Linear.from_linear(lin.bfloat16(), 32)
    lay = linear.Linear(256, 128).bfloat16()
    lay.load_state_dict(lin.bfloat16().state_dict())
    return lay


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("many", [0, 16])  # bf16.many: never fp32, fp32 from 16 rows
def test_blocked_many_rows_paths_agree(kind, many):
    """Many rows against a blocked weight: unblocked into a bf16 or an fp32 buffer for one GEMM."""
    lay = _layer(kind)
    with torch.no_grad():
        w = lay.dequantize() if kind != "bf16" else lay.weight
        x = torch.randn(70, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
        ref = x.double() @ w.double().T + lay.bias.double()
        assert lay.to_blocks_()
        with dispatch.force(**{"bf16.many": many, "bf16.kernel_rows": 8}):
            y = lay(x)
            few = lay(x[:5])  # under the crossover: the kernel
    assert y.dtype == few.dtype == torch.bfloat16
    tol = 2e-2 if kind == "int4" and many == 0 else 1e-2  # int4: the dequantized weight rounded to bf16
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().mean()))
    torch.testing.assert_close(few.double(), ref[:5], rtol=1e-2, atol=1e-2 * float(ref.abs().mean()))


@needs_kernels
def test_kernel_rows_sets_the_crossover():
    lay = _layer("bf16")
    assert lay.to_blocks_()
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        with dispatch.force(**{"bf16.kernel_rows": 6}):
            assert linear.kernel_rows() == 7
            by_kernel = lay(x)
            want = kernels.blocked_mm(x, lay.weight, None, lay.fp32_extras()[1])
        assert torch.equal(by_kernel, want)
        with dispatch.force(**{"bf16.kernel_rows": 3, "bf16.many": 1}):
            by_gemm = lay(x)
            want = linear.unblocked_product(x, lay.weight, None, lay.fp32_extras()[1]).bfloat16()
        assert torch.equal(by_gemm, want)
    assert layout.BLOCK[torch.bfloat16] == lay.block


def test_info_runtime_prints_the_machine_and_every_choice(monkeypatch, capsys):
    from blip2.apps.cli.main import main

    monkeypatch.setenv("BLIP2_DISPATCH", "torch,bf16.many=64")  # no measuring; one choice forced
    assert main(["info", "--runtime", "--json"]) == 0
    rt = json.loads(capsys.readouterr().out)
    assert rt["threads"] == torch.get_num_threads() and rt["torch"] == torch.__version__
    assert rt["kernels"].startswith(build.isa() or "none")
    choices = {r["op"]: r["choice"] for r in rt["dispatch"]}
    assert choices["bf16.many"] == 64 and choices["bf16.one"] == "mv" and set(choices) == set(dispatch.DEFAULTS)
    assert main(["info", "--runtime"]) == 0
    text = capsys.readouterr().out
    assert "C kernels" in text and "bf16.many" in text and "BLIP2_DISPATCH" in text
    assert main(["info"]) == 2  # neither a model nor --runtime
    assert "MODEL" in capsys.readouterr().err
