"""The CPU backend's Linear: the fp32 path for bf16 inputs on CPUs without native bf16 gives the bf16 answer."""

import pytest
import torch

import blip2.backends.cpu.bf16 as bf16
from blip2.backends.cpu.linear import UPCAST_MIN_ROWS, Linear


@pytest.mark.parametrize("rows", [1, 2, 15, 16, 300])
def test_upcast_path_matches_bf16_linear(rows, monkeypatch):
    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 80).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g) / 96**0.5)
        lin.bias.copy_(torch.randn(80, generator=g) * 0.1)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())

    monkeypatch.setattr(bf16, "cpu_has_native_bf16", lambda: False)
    slow_cpu = lin(x)
    monkeypatch.setattr(bf16, "cpu_has_native_bf16", lambda: True)
    native = lin(x)
    assert slow_cpu.dtype == native.dtype == torch.bfloat16
    # both are the exact result rounded to bf16 (at most one ulp apart from each other)
    for y in (slow_cpu, native):
        assert ((y.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()
    if 1 < rows < UPCAST_MIN_ROWS:
        assert torch.equal(slow_cpu, native)  # few rows: the bf16 kernel runs either way
    monkeypatch.setattr(bf16, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad():  # inference: the fp32 weights go into a reused scratch buffer
        assert torch.equal(lin(x), slow_cpu)
        assert torch.equal(lin(x[None]), slow_cpu[None])  # (B, T, K) inputs: the same rows
    slow_cpu.float().sum().backward()  # with grad: a fresh fp32 copy, differentiable
    assert lin.weight.grad is not None and lin.weight.grad.shape == lin.weight.shape


def test_scratch_buffer_is_not_aliased_between_layers(monkeypatch):
    """Two layers in a row share the scratch buffer: the second must not see the first's weights."""
    monkeypatch.setattr(bf16, "cpu_has_native_bf16", lambda: False)
    g = torch.Generator().manual_seed(1)
    a, b = Linear(32, 48).to(torch.bfloat16), Linear(48, 32).to(torch.bfloat16)
    x = torch.randn(40, 32, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
        y = b(a(x))
    ref = torch.nn.functional.linear(torch.nn.functional.linear(x.double(), a.weight.double(), a.bias.double())
                                     .to(torch.bfloat16).double(), b.weight.double(), b.bias.double())
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-2).all()


def test_fp32_inputs_untouched():
    lin = Linear(8, 4)
    x = torch.randn(100, 8)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
