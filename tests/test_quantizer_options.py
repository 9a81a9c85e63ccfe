"""The quantizer's options: asymmetric calibration (GPTAQ), the Hessian group layout, code refinement.

Each option must keep the EXL2 tensors exact (pack → independent unpack/dequantize reproduces the weight,
the stored size is exl2-format §3.3's formula) and lower the error it targets against a directly computed
reference.
"""

from __future__ import annotations

import pytest
import torch

from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.layout import choose_layout
from exl2core.quant.pack import dequantize, group_layout
from exl2core.quant.qparams import PERCDAMP, QParams, pad32, table_setting

from failure_helpers import correlated_inputs

K, N = 256, 96


def layout_cost(groups: list[tuple[int, int]], columns: int) -> int:
    """Storage bits of the packed tensors of a layout (exl2-format §3.3, no bias) with ``columns`` output features."""
    rows = sum(r for _, r in groups)
    return columns * sum(b * r for b, r in groups) + len(groups) * (48 + 4 * columns) + 32 * rows


def streams(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_ref, x)``: the unquantized model's inputs and the quantized model's, which carry an error
    correlated with them (a fixed linear drift, as an upstream quantized layer's, plus noise)."""
    x_ref = correlated_inputs(K, rows, seed)
    drift = torch.eye(K) + 0.15 * torch.randn(K, K, generator=torch.Generator().manual_seed(100)) / K ** 0.5
    noise = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed + 100))
    return x_ref, x_ref @ drift + 0.05 * x_ref.std() * noise


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(N, K, generator=gen) * 0.02).half()


def asymmetric_hessian(x_ref: torch.Tensor, x: torch.Tensor, batches: int = 4) -> Hessian:
    hessian = Hessian(K, asymmetric=True)
    for a, b in zip(x.chunk(batches), x_ref.chunk(batches)):
        hessian.add(a.unsqueeze(0), b.unsqueeze(0))
    return hessian


def reference_error(q: torch.Tensor, weight: torch.Tensor, x_ref: torch.Tensor, x: torch.Tensor) -> float:
    """``‖X̃ W − X Q‖ / ‖X̃ W‖``: the quantized linear on its real input against the unquantized model."""
    target = x_ref.double() @ weight.double().T
    return (torch.linalg.norm(x.double() @ q[: weight.shape[0]].double().T - target)
            / torch.linalg.norm(target)).item()


def assert_exact_tensors(q, qp: QParams, k: int) -> None:
    """Independent unpack/dequantize reproduces the weight bit for bit; stored bits are exl2-format §3.3's formula."""
    tensors = q.pack()
    assert torch.equal(dequantize(tensors), q.weight)
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert stored == qp.total_bits(k, q.weight.shape[0])
    bits, rows = group_layout(tensors["q_groups"], tensors["q_weight"].shape[0])
    assert bits == sorted(bits, reverse=True) and all(r % 32 == 0 for r in rows) and sum(rows) == k


# -- asymmetric calibration ---------------------------------------------------------------------------


def test_cross_term_is_xt_times_input_difference():
    x_ref, x = streams(512, seed=0)
    hessian = asymmetric_hessian(x_ref, x)
    torch.testing.assert_close(hessian.cross.double(), x.double().T @ (x_ref - x).double(), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(hessian.matrix.double(), x.double().T @ x.double(), rtol=1e-4, atol=1e-2)
    prepared = hessian.prepare("q_proj")
    perm = prepared.perm
    torch.testing.assert_close(prepared.cross, (hessian.cross / 4)[perm][:, perm])


def test_inputs_of_other_tokens_drop_the_cross_term():
    hessian = Hessian(K, asymmetric=True)
    hessian.add(torch.randn(1, 8, K), torch.randn(1, 8, K))
    hessian.add(torch.randn(1, 5, K), torch.randn(1, 3, K))  # an expert routed other tokens
    assert hessian.cross is None and hessian.prepare("w2").cross is None


@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_asymmetric_fit_matches_the_closed_form_at_high_bits(weight, strength):
    """At 8 bits GPTQ lands next to its target, which must be ``W* = W + s·H_d⁻¹ Xᵀ(X̃ − X) W``."""
    x_ref, x = streams(1024, seed=2)
    qp = QParams(32, [8], [1])
    q = quantize_linear(weight, asymmetric_hessian(x_ref, x).prepare("o_proj"), qp, asymmetric_weight=strength)
    h = x.double().T @ x.double() / 4
    h += torch.eye(K, dtype=torch.float64) * PERCDAMP * torch.diagonal(h).mean()
    cross = x.double().T @ (x_ref - x).double() / 4
    w = weight.double().T
    correction = torch.linalg.solve(h, cross @ w)
    target, other = (w + strength * correction).T, (w + (1.25 - strength) * correction).T
    assert (q.weight[:N].double() - target).norm() < 0.2 * (q.weight[:N].double() - other).norm()
    plain = quantize_linear(weight, Hessian.from_matrix(x.T @ x, 4).prepare("o_proj"), qp)
    assert (q.weight[:N].double() - target).norm() < 0.4 * (plain.weight[:N].double() - target).norm()
    assert_exact_tensors(q, qp, K)


@pytest.mark.parametrize("row", [0, 4, 8])
def test_asymmetric_fit_lowers_the_error_against_the_unquantized_output_on_held_out_rows(weight, row):
    x_ref, x = streams(8192, seed=3)
    held_ref, held = streams(2048, seed=4)
    qp = table_setting("attn", row, "o_proj")
    symmetric = Hessian(K)
    for chunk in x.chunk(4):
        symmetric.add(chunk)
    plain = quantize_linear(weight, symmetric.prepare("o_proj"), qp)
    fitted = quantize_linear(weight, asymmetric_hessian(x_ref, x).prepare("o_proj"), qp)
    assert_exact_tensors(fitted, qp, K)
    assert reference_error(fitted.weight, weight, held_ref, held) < 0.97 * reference_error(plain.weight, weight,
                                                                                          held_ref, held)


# -- code refinement ----------------------------------------------------------------------------------


def gptq_loss(q, prepared, target: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` with the damped, permuted Hessian GPTQ minimised."""
    delta = (q.weight[: target.shape[0]].double() - target.double()).T[prepared.perm]
    return torch.einsum("kn,kl,ln->", delta, prepared.damped().double(), delta).item()


def test_the_rebuilt_hessian_is_the_one_gptq_inverted():
    x = correlated_inputs(K, 1024, seed=12)
    prepared = Hessian.from_matrix(x.T @ x, 4).prepare("q_proj")
    upper = prepared.inv_upper.double()
    torch.testing.assert_close(prepared.damped().double() @ (upper.T @ upper), torch.eye(K, dtype=torch.float64),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("percdamp", [PERCDAMP, 0.01])
def test_damping_adds_its_fraction_of_the_mean_diagonal(percdamp):
    x = correlated_inputs(K, 1024, seed=13)
    hessian = Hessian.from_matrix(x.T @ x, 4)
    prepared = hessian.prepare("q_proj", percdamp=percdamp)
    h = hessian.mean()[prepared.perm][:, prepared.perm]
    damp = percdamp * torch.diagonal(h).mean().item()
    assert prepared.attempts == 1 and prepared.damp == pytest.approx(damp)
    torch.testing.assert_close(prepared.damped(), h + damp * torch.eye(K), rtol=0, atol=1e-6)


@pytest.mark.parametrize("row", [0, 4, 9])
def test_each_refinement_sweep_lowers_gptqs_loss_and_keeps_the_tensors_exact(row):
    k = 512
    x = correlated_inputs(k, 2048, seed=8)
    w = (torch.randn(96, k, generator=torch.Generator().manual_seed(9)) * 0.02).half()
    prepared = Hessian.from_matrix(x.T @ x, 1).prepare("down_proj")
    qp = table_setting("mlp", row, "down_proj")
    runs = [quantize_linear(w, prepared, qp, refine=sweeps) for sweeps in (0, 1, 2)]
    losses = [gptq_loss(q, prepared, w) for q in runs]
    assert losses[2] <= losses[1] < 0.99 * losses[0]
    for q in runs[1:]:
        assert_exact_tensors(q, qp, k)
        assert torch.equal(q.qscale, runs[0].qscale) and torch.equal(q.qscale_max, runs[0].qscale_max)
        assert (q.group_bits, q.group_rows) == (runs[0].group_bits, runs[0].group_rows)


def test_refinement_lowers_the_held_out_error_of_the_asymmetric_fit(weight):
    x_ref, x = streams(8192, seed=10)
    held_ref, held = streams(2048, seed=11)
    prepared = asymmetric_hessian(x_ref, x).prepare("o_proj")
    qp = table_setting("attn", 2, "o_proj")
    plain, refined = (quantize_linear(weight, prepared, qp, refine=sweeps) for sweeps in (0, 2))
    assert_exact_tensors(refined, qp, K)
    assert reference_error(refined.weight, weight, held_ref, held) < reference_error(plain.weight, weight,
                                                                                    held_ref, held)


# -- group layout -------------------------------------------------------------------------------------


LAYOUT_CASES = [("attn", 4, "q_proj", 576), ("mlp", 0, "down_proj", 1536), ("mlp", 4, "down_proj", 1536),
                ("mlp", 9, "down_proj", 512), ("mlp", 1, "up_proj", 256), ("attn", 12, "o_proj", 320)]


@pytest.mark.parametrize("table,row,role,k", LAYOUT_CASES)
def test_hessian_layout_has_exactly_the_tables_size(table, row, role, k):
    qp = table_setting(table, row, role)
    gen = torch.Generator().manual_seed(k + row)
    w = torch.randn(k, 64, generator=gen) * torch.exp(torch.randn(k, 1, generator=gen))
    weights = torch.exp(2 * torch.randn(k, generator=gen)).sort(descending=True).values
    groups = choose_layout(w, qp, "hessian", weights)
    bits = [b for b, _ in groups]
    assert len(groups) == len(qp.groups(k)) and sum(r for _, r in groups) == k
    assert bits == sorted(bits, reverse=True) and set(bits) <= set(qp.bits)
    assert all(r > 0 and r % 32 == 0 for _, r in groups)
    for columns in (32, 64, 576):
        assert layout_cost(groups, columns) == qp.total_bits(k, columns)


def test_layout_moves_bits_to_the_rows_that_carry_the_error():
    """Rows of equal weight but very unequal GPTQ charge: the high width goes where the charge is, and
    the layout's expected loss is below the table's."""
    qp = table_setting("mlp", 0, "down_proj")  # 5 % at 6 bits, 20 % at 3, 75 % at 2
    k = 512
    w = torch.randn(k, 64, generator=torch.Generator().manual_seed(0))
    flat = choose_layout(w, qp, "hessian", torch.ones(k))
    spiked = choose_layout(w, qp, "hessian", torch.cat([torch.full((32,), 1e4), torch.ones(k - 32)]))
    assert all(b != 6 for b, _ in flat)  # equal charges: spreading bits beats a few 6-bit rows
    assert spiked[0] == (6, 32)  # one heavy unit: it gets the most bits


@pytest.mark.parametrize("row", [0, 4, 9])  # three widths each: rows can move between them
def test_hessian_layout_round_trips_and_lowers_the_held_out_error(weight, row):
    k = 512
    rows = correlated_inputs(k, 3072, seed=5)  # one distribution: calibration rows, then held-out rows
    x, held = rows[:2048], rows[2048:]
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(96, k, generator=gen) * 0.02).half()
    prepared = Hessian.from_matrix(x.T @ x, 1).prepare("down_proj")
    qp = table_setting("mlp", row, "down_proj")
    table = quantize_linear(w, prepared, qp)
    chosen = quantize_linear(w, prepared, qp, layout="hessian")
    assert_exact_tensors(chosen, qp, k)

    def error(q) -> float:
        delta = q.weight[:96].float() - w.float()
        return (torch.linalg.norm(held @ delta.T) / torch.linalg.norm(held @ w.float().T)).item()

    assert error(chosen) < error(table)


def test_unknown_layout_is_a_clear_error(weight):
    from exl2core.errors import Exl2Error

    with pytest.raises(Exl2Error, match="unknown group layout"):
        quantize_linear(weight, Hessian(K).prepare("x"), QParams(32, [4], [1]), layout="greedy")


def test_default_arguments_give_the_table_layout(weight):
    x = correlated_inputs(K, 512, 7)
    qp = table_setting("mlp", 4, "down_proj")
    q = quantize_linear(weight, Hessian.from_matrix(x.T @ x, 1).prepare("x"), qp)
    assert list(zip(q.group_bits, q.group_rows)) == qp.groups(K) and q.weight.shape[0] == pad32(N)
