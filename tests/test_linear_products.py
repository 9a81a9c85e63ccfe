"""Products in bfloat16 (``modules.linear.linear_products_in``, ``gptq.Hessian(products=...)``): the linears,
attention and Hessians the quantization pass multiplies in on CPUs with native bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exl2core.errors import Exl2Error
from exl2core.modules.attention import attend
from exl2core.modules.linear import apply_linear, linear_products_in, native_product_dtype
from exl2core.pipeline.quantize import QuantizerOptions
from exl2core.quant.gptq import Hessian


@pytest.fixture
def operands():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen)
    weights = {"w": torch.randn(80, 96, generator=gen) / 10, "w.bias": torch.randn(80, generator=gen)}
    return x, weights


def test_bfloat16_products_round_the_operands_and_return_float32(operands):
    x, weights = operands
    with linear_products_in(torch.bfloat16):
        y = apply_linear(weights, "w", x)
    assert y.dtype == torch.float32
    rounded = F.linear(x.bfloat16().float(), weights["w"].bfloat16().float(), weights["w.bias"].bfloat16().float())
    exact = F.linear(x, weights["w"], weights["w.bias"])
    # The product of the rounded operands, itself rounded once to bfloat16 (a relative 2^-9 per element).
    assert torch.allclose(y, rounded, rtol=2 ** -8, atol=1e-2)
    assert 1e-4 < ((y - exact).norm() / exact.norm()).item() < 1e-2


def test_without_the_context_and_after_it_products_are_float32(operands):
    x, weights = operands
    exact = F.linear(x, weights["w"], weights["w.bias"])
    assert torch.equal(apply_linear(weights, "w", x), exact)
    with linear_products_in(torch.bfloat16), linear_products_in(None):
        assert torch.equal(apply_linear(weights, "w", x), exact)
    with linear_products_in(torch.bfloat16):
        pass
    assert torch.equal(apply_linear(weights, "w", x), exact)


def test_half_precision_weights_keep_their_own_dtype(operands):
    x, weights = operands
    half = {name: t.half() for name, t in weights.items()}
    with linear_products_in(torch.bfloat16):
        y = apply_linear(half, "w", x.half())
    assert y.dtype == torch.float16


def test_native_products_are_bfloat16_only_on_a_cpu_that_has_them():
    assert native_product_dtype("cuda") == "float32"
    assert native_product_dtype("cpu") == ("bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32")


def test_unknown_matmul_dtype_is_a_clear_error():
    with pytest.raises(Exl2Error, match="matmul dtype must be one of float32, bfloat16"):
        QuantizerOptions(matmul_dtype="float16")


def test_bfloat16_attention_is_close_to_float32_and_returns_float32():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 32, 16, generator=gen) for _ in range(3))
    exact = attend(q, k[:, :2], v[:, :2], scale=0.25)
    with linear_products_in(torch.bfloat16):
        y = attend(q, k[:, :2], v[:, :2], scale=0.25)
        windowed = attend(q, k, v, scale=0.25, window=8)
    assert y.dtype == windowed.dtype == torch.float32
    assert 1e-4 < ((y - exact).norm() / exact.norm()).item() < 1e-2
    assert torch.allclose(windowed, attend(q, k, v, scale=0.25, window=8), atol=2e-2)


def test_bfloat16_hessian_is_the_product_of_the_rounded_inputs():
    """Rounded once per row and summed in float32: over many rows the product's rounding averages out."""
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randn(1, 256, 48, generator=gen) for _ in range(32)]
    h, exact = Hessian(48, asymmetric=True, products=torch.bfloat16), Hessian(48, asymmetric=True)
    for i, x in enumerate(rows):
        h.add(x, x * 1.1, row=i)
        exact.add(x, x * 1.1, row=i)
    rounded = sum(x[0].bfloat16().double().T @ x[0].bfloat16().double() for x in rows)
    assert ((h.matrix.double() - rounded).norm() / rounded.norm()).item() < 1e-3
    assert ((h.cross - exact.cross).norm() / exact.cross.norm()).item() < 1e-2
    assert not torch.equal(h.matrix, exact.matrix)
