"""The CPU backend's Linear: every bf16 path dispatch can choose (fp32 GEMM or bf16 for many rows,
torch.mv or F.linear for one) gives the bf16 answer."""

import pytest
import torch

from blip2.backends.cpu import dispatch
from blip2.backends.cpu.linear import Linear

MANY_ROWS = 16
FP32 = {"bf16.many": MANY_ROWS, "bf16.one": "mv"}  # a CPU that emulates bf16: fp32 from 16 rows
BF16 = {"bf16.many": 0, "bf16.one": "linear"}  # a CPU with fast bf16 GEMMs: never fp32


@pytest.mark.parametrize("rows", [1, 2, 15, 16, 300])
def test_upcast_path_matches_bf16_linear(rows):
    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 80).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g) / 96**0.5)
        lin.bias.copy_(torch.randn(80, generator=g) * 0.1)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())

    with dispatch.force(**FP32):
        slow_cpu = lin(x)
    with dispatch.force(**BF16):
        native = lin(x)
    assert slow_cpu.dtype == native.dtype == torch.bfloat16
    # both are the exact result rounded to bf16 (at most one ulp apart from each other)
    for y in (slow_cpu, native):
        assert ((y.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-3).all()
    if 1 < rows < MANY_ROWS:
        assert torch.equal(slow_cpu, native)  # few rows: F.linear in bf16 either way
    with dispatch.force(**FP32), torch.no_grad():  # inference: the fp32 weights go into a reused scratch buffer
        assert torch.equal(lin(x), slow_cpu)
        assert torch.equal(lin(x[None]), slow_cpu[None])  # (B, T, K) inputs: the same rows
    slow_cpu.float().sum().backward()  # with grad: a fresh fp32 copy, differentiable
    assert lin.weight.grad is not None and lin.weight.grad.shape == lin.weight.shape


@dispatch.force(**FP32)
def test_scratch_buffer_is_not_aliased_between_layers():
    """Two layers in a row share the scratch buffer: the second must not see the first's weights."""
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
