"""Token weights of the quantization Hessians: squared output gradients per token, their rows, their mix."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.modules.forward import module_forward
from exl2core.modules.linear import observe_linear_outputs
from exl2core.pipeline.collect import collect
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.sensitivity import HEAD_CHUNK, SENSITIVITY_MEMORY
from exl2core.pipeline.token_weights import (TOKEN_WEIGHT_TOKENS, TokenWeights, measure_token_weights,
                                             token_weight_rows)
from exl2core.plugins import resolve_plan


def _open(model):
    source = SourceModel(model.path)
    plan = resolve_plan(source.config)
    return source, plan, lambda m: source.module_weights(m, torch.float32, "cpu")


def _direct_energies(plan, weights_of, ids, seed):
    """``Σ_o g_{t,o}²`` per token of every linear's output, from one autograd graph through the whole
    model per row, with labels drawn as the streamed pass draws them (rows shorter than its head chunk)."""
    gen = torch.Generator().manual_seed(seed)
    energies: dict[tuple[str, str], list[torch.Tensor]] = {}
    for row in ids:
        outputs: list[tuple[str, str, torch.Tensor]] = []
        with torch.enable_grad():
            x = row.unsqueeze(0)
            for module in plan.modules:
                def keep(name, y, key=module.key):
                    if y.requires_grad:
                        y.retain_grad()
                        outputs.append((key, name, y))

                with observe_linear_outputs(keep):
                    x = module_forward(module)(module, weights_of(module), x, None)
                if module is plan.modules[0]:
                    x = x.detach().requires_grad_(True)
            logp = torch.log_softmax(x.float(), -1)
            p = torch.softmax(x.detach().float(), -1).reshape(-1, x.shape[-1])
            labels = torch.multinomial(p, 1, generator=gen)
            logp.reshape(-1, logp.shape[-1]).gather(1, labels).sum().backward()
        for key, name, y in outputs:
            if y.grad is not None:
                energies.setdefault((key, name), []).append(y.grad.reshape(-1, y.shape[-1]).double().pow(2).sum(1))
    return energies


def test_weights_are_the_squared_output_gradients_normalised_per_input(tiny_llama):
    source, plan, weights_of = _open(tiny_llama)
    ids = tiny_llama.random_ids(batch=3, length=40)
    assert ids.shape[1] <= HEAD_CHUNK
    measured = measure_token_weights(plan, weights_of, ids, [0, 2], "cpu", seed=5)
    direct = _direct_energies(plan, weights_of, ids[[0, 2]], seed=5)
    assert measured.rows == (0, 2) and measured.total_rows == 3
    checked = 0
    for module in [m for m in plan.modules if m.slots]:
        sites: dict[str, list[torch.Tensor]] = {}
        for lin in module.linears:
            energy = torch.stack(direct[(module.key, lin.name)])
            sites.setdefault(lin.input, []).append(energy / energy.mean())
        for site, parts in sites.items():
            got = measured.weights[TokenWeights.key(module, site)]
            assert got.shape == (2, 40) and torch.isfinite(got).all() and (got > 0).all()
            torch.testing.assert_close(got.double(), torch.stack(parts).mean(0), rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 2 * len([m for m in plan.modules if m.slots])  # attention in and out, MLP in and down


def test_weights_are_deterministic_and_saved_exactly(tiny_llama, tmp_path):
    _, plan, weights_of = _open(tiny_llama)
    ids = tiny_llama.random_ids(batch=2, length=24)
    a = measure_token_weights(plan, weights_of, ids, [1], "cpu", seed=2)
    b = measure_token_weights(plan, weights_of, ids, [1], "cpu", seed=2)
    a.save(tmp_path / "w.safetensors")
    c = TokenWeights.load(tmp_path / "w.safetensors")
    assert (c.rows, c.total_rows) == ((1,), 2)
    for key, w in a.weights.items():
        assert torch.equal(w, b.weights[key]) and torch.equal(w, c.weights[key])


def test_rows_are_text_rows_spread_evenly_and_bounded(tiny_llama):
    _, plan, _ = _open(tiny_llama)
    ids = torch.arange(40 * 1024).view(40, 1024)
    ids[0, 0] = ids[39, 0] = -1  # noise rows
    rows = token_weight_rows(ids, plan, 4)
    assert len(rows) == TOKEN_WEIGHT_TOKENS // 1024 and 0 not in rows and 39 not in rows
    assert rows == sorted(rows) and rows[0] == 1 and rows[-1] > 30
    wide = replace(plan, config=replace(plan.config, hidden_size=4096), modules=plan.modules * 40)
    assert token_weight_rows(ids, wide, 4) == [1]  # memory for less than two rows: one whole row
    assert 4096 * len(wide.modules) * 4 * 1024 > SENSITIVITY_MEMORY // 2
    with pytest.raises(Exl2Error, match="no text row"):
        token_weight_rows(torch.full((2, 8), -1), plan, 4)


def test_factors_mix_the_weighted_rows_in_at_the_strength(tiny_llama):
    _, plan, _ = _open(tiny_llama)
    block = plan.modules[1]
    w = torch.tensor([[0.5, 1.5], [2.0, 0.0]])
    weights = TokenWeights(rows=(1, 3), total_rows=4, weights={TokenWeights.key(block, "attn_in"): w})
    factor = weights.factors(block, 0.25)
    torch.testing.assert_close(factor("attn_in", 3), (1 + 0.25 / 0.75 * 2 * w[1]).sqrt())
    assert factor("attn_in", 0) is None and factor("mlp_in", 1) is None
    assert weights.factors(block, 0.0)("attn_in", 1) is None
    with pytest.raises(Exl2Error, match=r"in \[0, 1\)"):
        weights.factors(block, 1.0)


def test_collected_hessian_is_the_token_weighted_sum(tiny_llama):
    source, plan, weights_of = _open(tiny_llama)
    ids = tiny_llama.random_ids(batch=2, length=16)
    with torch.inference_mode():
        states = HiddenStates([module_forward(plan.modules[0])(plan.modules[0], weights_of(plan.modules[0]),
                                                               r.unsqueeze(0)).squeeze(0) for r in ids], "cpu")
    block = plan.modules[1]
    weights = weights_of(block)
    factors = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    inputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(2):
            module_forward(block)(block, weights, states.row(i),
                                  lambda name, x: inputs.append(x.reshape(-1, x.shape[-1])) if name == "attn_in" else None)
    got = collect(module_forward(block), block, weights, states,
                  token_factor=lambda name, row: factors[row] if name == "attn_in" else None).hessians
    plain = collect(module_forward(block), block, weights, states).hessians
    expected = sum((x * f[:, None]).T @ (x * f[:, None]) for x, f in zip(inputs, factors))
    torch.testing.assert_close(got["attn_in"].matrix, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["attn_out"].matrix, plain["attn_out"].matrix)
