"""Fast measurement: the Hessian-scored candidate errors and the output sensitivity behind the predicted KL."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.modules.forward import module_forward
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.measure import estimate_module, measure_module
from exl2core.pipeline.runner import forward_rows, prepare_hessians
from exl2core.pipeline.sensitivity import (SENSITIVITY_MEMORY, Sensitivity, measure_sensitivity, sensitivity_rows,
                                           sensitivity_steps)
from exl2core.plugins import resolve_plan
from exl2core.quant.gptq import quantize_linear
from exl2core.quant.qparams import TABLES, table_setting


def _open(model):
    source = SourceModel(model.path)
    return source, resolve_plan(source.config)


def _sensitivity(model, ids, seed=0):
    source, plan = _open(model)
    calls = []
    sens = measure_sensitivity(plan, lambda m: source.module_weights(m, torch.float32, "cpu"), ids, "cpu", seed,
                               on_module=lambda: calls.append(1))
    assert len(calls) == sensitivity_steps(plan)
    return source, plan, sens


def _states(source, plan, ids, upto):
    """Hidden states of ``ids`` at the input of module ``upto``."""
    rows = [r.unsqueeze(0) for r in ids]
    with torch.inference_mode():
        for module in plan.modules[:upto]:
            w = source.module_weights(module, torch.float32, "cpu")
            rows = [module_forward(module)(module, w, r) for r in rows]
    return HiddenStates([r.squeeze(0) for r in rows], "cpu")


def _kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


#: One tiny model per forward family: dense, MoE, parallel decoder, Gemma 3 (soft caps, windows, q/k norms).
FAMILIES = {"llama": {}, "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
            "cohere": {}, "gemma3_text": dict(num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sensitivities_cover_every_measured_linear_finite_and_positive(tiny_model, name):
    model = tiny_model(name, **FAMILIES[name])
    ids = model.random_ids(batch=2, length=32)
    _, plan, sens = _sensitivity(model, ids)
    for module in plan.modules:
        for slot in module.slots:
            for lin in module.linears:
                if lin.role in slot.roles:
                    g = sens.of(module, lin.name)
                    assert g.shape == (lin.out_features,) and g.dtype == torch.float64
                    assert torch.isfinite(g).all() and (g >= 0).all()
                    if not lin.name.startswith("experts."):  # an expert may see no sampled token
                        assert g.sum() > 0, (module.key, lin.name)


def test_sensitivity_after_inference_mode_forwards(tiny_llama):
    """Tables cached by an earlier forward under inference mode (measurement) serve the backward pass."""
    ids = tiny_llama.random_ids(batch=1, length=40)
    source, plan = _open(tiny_llama)
    with torch.inference_mode():
        forward_logits(source, plan, ids)
    _sensitivity(tiny_llama, ids)


def test_sensitivity_is_deterministic_and_saved_exactly(tiny_llama, tmp_path):
    ids = tiny_llama.random_ids(batch=2, length=24)
    a = _sensitivity(tiny_llama, ids, seed=3)[2]
    b = _sensitivity(tiny_llama, ids, seed=3)[2]
    a.save(tmp_path / "s.safetensors")
    c = Sensitivity.load(tmp_path / "s.safetensors")
    for key, g in a.grads.items():
        assert torch.equal(g, b.grads[key]) and torch.equal(g, c.grads[key])


def test_sensitivity_rows_skip_noise_rows_and_bound_tokens_and_memory(tiny_llama):
    _, plan = _open(tiny_llama)
    ids = torch.arange(40 * 1024).view(40, 1024)
    ids[0, 0] = -1
    rows = sensitivity_rows(ids, plan, 4)
    assert rows.shape == (8, 1024) and bool((rows[:, 0] >= 0).all()) and torch.equal(rows[0], ids[1])
    wide = replace(plan, config=replace(plan.config, hidden_size=4096), modules=plan.modules * 40)
    per_token = 4096 * len(wide.modules) * 4  # between the minimum and one 1024-token row
    rows = sensitivity_rows(ids, wide, 4)
    assert rows.shape == (1, SENSITIVITY_MEMORY // per_token) and torch.equal(rows[0], ids[1, :rows.shape[1]])


def test_predicted_kl_of_a_weight_error_matches_the_models_kl(tiny_llama):
    """A small random error in one linear: ½ Σ g_o (ΔW H ΔWᵀ)_oo / N against the KL measured on the
    same tokens by running the perturbed model (second-order estimate; within a factor 1.5)."""
    model = tiny_llama
    ids = model.random_ids(batch=16, length=48, seed=1)
    source, plan, sens = _sensitivity(model, ids)
    ref = forward_logits(source, plan, ids)
    gen = torch.Generator().manual_seed(5)
    for idx, name in [(1, "v_proj"), (2, "down_proj"), (3, "q_proj"), (4, "gate_proj")]:
        module = plan.modules[idx]
        weights = source.module_weights(module, torch.float32, "cpu")
        hessians: dict = {}
        forward_rows(module_forward(module), module, weights, _states(source, plan, ids, idx), hessians)
        w = weights[name]
        dw = 0.05 * w.abs().mean() * torch.randn(w.shape, generator=gen)
        h = hessians[module.linear(name).input].matrix
        predicted = 0.5 * (sens.of(module, name) * ((dw @ h) * dw).sum(1).double()).sum().item() / ids.numel()
        actual = _kl(ref, forward_logits(source, plan, ids, weights_override=lambda m, i=idx, n=name, d=dw:
                                         {n: source.module_weights(m, torch.float32, "cpu")[n] + d}
                                         if m is plan.modules[i] else None))
        assert actual > 0 and 1 / 1.5 < predicted / actual < 1.5, (module.key, name, predicted, actual)


def _random_states(model, rows=3, length=20, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return HiddenStates([torch.randn(length, model.hf.config.hidden_size, generator=gen) for _ in range(rows)],
                        "cpu")


def test_fast_records_match_a_direct_computation(tiny_llama):
    """Each fast record's accuracy is 1 − sqrt(Σ‖ΔW X‖² / Σ‖W X‖²) over the slot's linears, and its predicted
    KL ½ Σ g_o ‖(ΔW X)_o‖² / N, both recomputed here from the linears' inputs themselves."""
    source, plan = _open(tiny_llama)
    sens = _sensitivity(tiny_llama, tiny_llama.random_ids(batch=2, length=24))[2]
    module = plan.modules[1]
    weights = source.module_weights(module, torch.float32, "cpu")
    states = _random_states(tiny_llama)
    fwd = module_forward(module)
    record, kl, targets = estimate_module(fwd, module, weights, states, sens, "hessian")
    torch.testing.assert_close(targets, forward_rows(fwd, module, weights, states))
    inputs: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for i in range(len(states)):
            fwd(module, weights, states.row(i), lambda n, x: inputs.setdefault(n, []).append(x.reshape(-1, x.shape[-1])))
    x = {n: torch.cat(v) for n, v in inputs.items()}
    hessians: dict = {}
    forward_rows(fwd, module, weights, states, hessians)
    prepared = prepare_hessians(module, hessians, "cpu")
    tokens = sum(x_.shape[0] for x_ in inputs["hidden"][:1]) if "hidden" in inputs else 3 * 20
    assert len(record) == len(TABLES["attn"]) == len(kl)
    # Per-linear scales (``--sensitivity linear``) weight each linear's share by its own factor.
    factors = {lin.name: 1.0 + i for i, lin in enumerate(module.linears)}
    scaled = replace(sens, linear_scales={Sensitivity.key(module, n): f for n, f in factors.items()})
    scaled_kl = estimate_module(fwd, module, weights, states, scaled, "hessian")[1]
    for row in (0, 7, len(record) - 1):
        noise = signal = predicted = weighted = 0.0
        for lin in module.linears:
            q = quantize_linear(weights[lin.name], prepared[lin.name], table_setting("attn", row, lin.role))
            dw = q.weight[: lin.out_features].float() - weights[lin.name]
            out_err = x[lin.input] @ dw.T
            noise += out_err.pow(2).sum().item()
            signal += (x[lin.input] @ weights[lin.name].T).pow(2).sum().item()
            share = 0.5 * (sens.of(module, lin.name) * out_err.double().pow(2).sum(0)).sum().item() / tokens
            predicted += share
            weighted += factors[lin.name] * share
        assert math.isclose(record[row]["accuracy"], 1 - math.sqrt(noise / signal), rel_tol=1e-5)
        assert math.isclose(kl[row], predicted, rel_tol=1e-4)
        assert math.isclose(scaled_kl[row], weighted, rel_tol=1e-4)
        assert record[row]["total_bits"] == measure_module(fwd, module, weights, states)[0][row]["total_bits"]


def test_a_forward_that_bypasses_apply_linear_is_a_clear_error(tiny_llama, monkeypatch):
    """A plugin forward computing its linears itself would get zero sensitivity (and the fewest bits)."""
    import torch.nn.functional as F

    from exl2core.errors import Exl2Error
    from exl2core.modules import attention

    monkeypatch.setattr(attention, "apply_linear", lambda w, name, x: F.linear(x, w[name], w.get(name + ".bias")))
    with pytest.raises(Exl2Error, match=r"self_attn: its forward applies no linear .* --measure exact"):
        _sensitivity(tiny_llama, tiny_llama.random_ids(batch=1, length=16))


def test_expected_gptq_error_tracks_gptqs_real_error(tiny_llama):
    """``fast`` mode's expected error of each setting against the error GPTQ really reaches, per linear of a
    block: the same order of the costliest settings, and errors within a factor 1.25 (KL 1.5)."""
    source, plan = _open(tiny_llama)
    sens = _sensitivity(tiny_llama, tiny_llama.random_ids(batch=2, length=24))[2]
    for idx in (1, 2):
        module = plan.modules[idx]
        weights = source.module_weights(module, torch.float32, "cpu")
        states = _random_states(tiny_llama, rows=8, length=32)
        fwd = module_forward(module)
        hessian_records, hessian_kl, _ = estimate_module(fwd, module, weights, states, sens, "hessian")
        fast_records, fast_kl, _ = estimate_module(fwd, module, weights, states, sens, "fast")
        real = [1 - r["accuracy"] for r in hessian_records]
        expected = [1 - r["accuracy"] for r in fast_records]
        assert all(1 / 1.25 < e / r < 1.25 for e, r in zip(expected, real)), (module.key, expected, real)
        assert all(1 / 1.5 < e / r < 1.5 for e, r in zip(fast_kl, hessian_kl))
        order = sorted(range(len(real)), key=real.__getitem__)
        assert sorted(range(len(expected)), key=expected.__getitem__)[-3:] == order[-3:]


def test_non_finite_logits_are_a_clear_error(tiny_llama):
    from exl2core.errors import Exl2Error

    source, plan = _open(tiny_llama)

    def weights_of(module):
        w = source.module_weights(module, torch.float32, "cpu")
        if module.kind == "head":
            w["lm_head"][0, 0] = float("inf")
        return w

    with pytest.raises(Exl2Error, match="non-finite logits in the sensitivity pass"):
        measure_sensitivity(plan, weights_of, tiny_llama.random_ids(batch=1, length=16), "cpu", 0)
