"""The marginal-KL pass: each slot's measured share of a quantized model's KL, which scales its predictions."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import free_port

from exl2core.cli import main
from exl2core.distributed import Ranks
from exl2core.model.source import SourceModel
from exl2core.modules.forward import module_forward
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.marginal import (LINEAR_SCALE_RANGE, SCALE_RANGE, Marginals, measure_marginals,
                                       reference_settings)
from exl2core.pipeline.runner import forward_rows, prepare_hessians
from exl2core.pipeline.sensitivity import Sensitivity, measure_sensitivity
from exl2core.plugins import resolve_plan
from exl2core.quant.gptq import quantize_linear

CAL = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "--device", "cpu"]


def run_cli(args: list[str]) -> int:
    return main(["convert", *args])


def _setup(model, ids):
    source = SourceModel(model.path)
    plan = resolve_plan(source.config)
    weights_of = lambda m: source.module_weights(m, torch.float32, "cpu")  # noqa: E731
    return plan, weights_of, measure_sensitivity(plan, weights_of, ids, "cpu", 0)


def _direct_marginals(plan, weights_of, ids, mode: str) -> dict[str, float]:
    """The same quantity the plain way: every slot's reference quantization from Hessians of the
    unquantized model's inputs, then whole-model forwards: all slots quantized and each one left out, or
    each slot (``linear``: each linear) quantized alone."""
    states = HiddenStates([r for r in ids], "cpu")
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    rows = [r.unsqueeze(0) for r in ids]
    with torch.inference_mode():
        for module in plan.modules:
            w = weights_of(module)
            fwd = module_forward(module)
            if module.slots:
                hessians = {}
                forward_rows(fwd, module, w, states, hessians)
                prepared = prepare_hessians(module, hessians, "cpu")
                q = dict(w)
                for slot in module.slots:
                    for name, qp in reference_settings(slot, module).items():
                        q[name] = quantize_linear(w[name], prepared[name], qp).weight[: w[name].shape[0]].to(w[name])
                quantized[module.measurement_key] = q
            rows = [fwd(module, w, r, None) for r in rows]
            states = HiddenStates([r.squeeze(0) for r in rows], "cpu")

    units: dict[str, set[tuple[str, str]]] = {}  # key → the (module, linear) pairs it quantizes
    for module in plan.modules:
        for slot in module.slots:
            names = [lin.name for lin in module.linears if lin.role in slot.roles]
            if mode == "linear":
                units.update({f"{module.measurement_key}/{n}": {(module.measurement_key, n)} for n in names})
            else:
                units[slot.key] = {(module.measurement_key, n) for n in names}

    def logits(quantized_linears: set[tuple[str, str]]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for row in ids:
                x = row.unsqueeze(0)
                for module in plan.modules:
                    w = dict(weights_of(module))
                    for lin in module.linears:
                        if (module.measurement_key, lin.name) in quantized_linears:
                            w[lin.name] = quantized[module.measurement_key][lin.name]
                    x = module_forward(module)(module, w, x, None)
                out.append(x.squeeze(0))
        return torch.cat(out)

    p = torch.log_softmax(logits(set()).float(), -1)

    def kl(z: torch.Tensor) -> float:
        q = torch.log_softmax(z.float(), -1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    if mode != "marginal":
        return {key: kl(logits(linears)) for key, linears in units.items()}
    everything = set().union(*units.values())
    total = kl(logits(everything))
    return {key: total - kl(logits(everything - linears)) for key, linears in units.items()}


@pytest.mark.parametrize("mode", ["marginal", "isolated", "linear"])
def test_measured_marginals_match_a_direct_computation(tiny_llama, mode):
    ids = tiny_llama.random_ids(batch=2, length=48)
    plan, weights_of, sens = _setup(tiny_llama, ids)
    calls = []
    marginals = measure_marginals(plan, weights_of, ids, "cpu", sens, mode=mode, samples=0,
                                  on_module=lambda: calls.append(1))
    assert len(calls) == len(plan.modules)
    direct = _direct_marginals(plan, weights_of, ids, mode)
    assert marginals.measured.keys() == direct.keys() == marginals.predicted.keys()
    for key, value in direct.items():
        assert marginals.measured[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert all(v > 0 and math.isfinite(v) for v in marginals.predicted.values())


MODES = ("marginal", "isolated", "linear")


def _marginals_on_rank(rank: int, world: int, port: int, model_path: str, ids: torch.Tensor, out: str) -> None:
    """Every mode's marginals on rank ``rank`` of ``world`` gloo ranks (one thread each); rank 0 saves them."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    source = SourceModel(model_path)
    plan = resolve_plan(source.config)
    weights_of = lambda m: source.module_weights(m, torch.float32, "cpu")  # noqa: E731
    sens = measure_sensitivity(plan, weights_of, ids, "cpu", 0)
    found = {mode: measure_marginals(plan, weights_of, ids, "cpu", sens, mode=mode, samples=16,
                                     ranks=Ranks(rank, world))
             for mode in MODES}
    if rank == 0:
        torch.save({mode: (m.predicted, m.measured) for mode, m in found.items()}, out)
    if world > 1:
        dist.destroy_process_group()


def test_ranks_share_the_streams_and_get_the_marginals_of_one(tiny_llama, tmp_path):
    """Streams dealt out over 2 and 3 ranks give every rank the 1-rank marginals to the bit, keys in order."""
    ids = tiny_llama.random_ids(batch=2, length=48)
    results = {}
    for world in (1, 2, 3):
        out = tmp_path / f"world{world}.pt"
        mp.spawn(_marginals_on_rank, args=(world, free_port(), str(tiny_llama.path), ids, str(out)), nprocs=world)
        results[world] = torch.load(out)
    for world in (2, 3):
        for mode in MODES:
            for one, many in zip(results[1][mode], results[world][mode]):
                assert list(many.items()) == list(one.items()), (world, mode)


def test_sampled_kl_estimates_the_whole_vocabulary_kl(tiny_llama):
    """The KL from vocabulary entries drawn from p (``log E_p[e^Δz] − E_p[Δz]``) against the whole sum: within
    a few per cent at 2048 draws a token, its bias (about −KL / draws) and noise shrinking with more. At 16
    draws a token a row's draws miss part of the vocabulary, so each stream's logits are those of a cut head."""
    ids = tiny_llama.random_ids(batch=2, length=48)
    plan, weights_of, sens = _setup(tiny_llama, ids)
    exact = measure_marginals(plan, weights_of, ids, "cpu", sens, mode="linear", samples=0).measured
    errors = {}
    for samples in (16, 2048):
        sampled = measure_marginals(plan, weights_of, ids, "cpu", sens, mode="linear", samples=samples).measured
        assert sampled.keys() == exact.keys()
        errors[samples] = [abs(sampled[k] / exact[k] - 1) for k in exact]
    assert max(errors[16]) < 0.25
    assert max(errors[2048]) < 0.05
    assert sum(errors[2048]) < sum(errors[16])


@pytest.mark.parametrize("name,dims", [("mixtral", dict(num_local_experts=4, num_experts_per_tok=2,
                                                        intermediate_size=64)),
                                       ("cohere", {})])
def test_scales_are_finite_and_bounded_for_moe_and_parallel_models(tiny_model, name, dims):
    model = tiny_model(name, **dims)
    ids = model.random_ids(batch=2, length=32)
    plan, weights_of, sens = _setup(model, ids)
    scales = measure_marginals(plan, weights_of, ids, "cpu", sens).scales()
    assert set(scales) == {slot.key for m in plan.modules for slot in m.slots}
    assert all(SCALE_RANGE[0] <= s <= SCALE_RANGE[1] for s in scales.values())


def test_scales_are_the_clamped_ratio():
    m = Marginals(predicted={"a": 0.01, "b": 0.01, "c": 0.01, "d": 0.0},
                  measured={"a": 0.02, "b": -0.001, "c": 1.0, "d": 0.3})
    assert m.scales() == {"a": pytest.approx(2.0), "b": SCALE_RANGE[0], "c": SCALE_RANGE[1], "d": 1.0}
    wide = Marginals(m.predicted, m.measured, LINEAR_SCALE_RANGE)
    assert wide.scales() == {"a": pytest.approx(2.0), "b": LINEAR_SCALE_RANGE[0], "c": pytest.approx(16.0), "d": 1.0}


def test_linear_scales_take_the_wider_bounds(tiny_llama):
    """Per-linear scales are clamped to LINEAR_SCALE_RANGE, slot scales to SCALE_RANGE."""
    ids = tiny_llama.random_ids(batch=2, length=32)
    plan, weights_of, sens = _setup(tiny_llama, ids)
    assert measure_marginals(plan, weights_of, ids, "cpu", sens, mode="linear").bounds == LINEAR_SCALE_RANGE
    assert measure_marginals(plan, weights_of, ids, "cpu", sens, mode="isolated").bounds == SCALE_RANGE


def test_sensitivity_file_keeps_the_scales(tmp_path):
    grads = {"model.layers.0.self_attn/q_proj": torch.rand(8, dtype=torch.float64)}
    Sensitivity(grads, {"model.layers.0.self_attn": 1.75}).save(tmp_path / "s.safetensors")
    loaded = Sensitivity.load(tmp_path / "s.safetensors")
    assert loaded.scales == {"model.layers.0.self_attn": 1.75} and loaded.linear_scales is None
    Sensitivity(grads, linear_scales={"model.layers.0.self_attn/q_proj": 2.5}).save(tmp_path / "l.safetensors")
    loaded = Sensitivity.load(tmp_path / "l.safetensors")
    assert loaded.scales is None and loaded.linear_scales == {"model.layers.0.self_attn/q_proj": 2.5}
    assert loaded.grads.keys() == grads.keys()
    assert torch.equal(loaded.grads["model.layers.0.self_attn/q_proj"], grads["model.layers.0.self_attn/q_proj"])
    Sensitivity(grads).save(tmp_path / "f.safetensors")
    assert Sensitivity.load(tmp_path / "f.safetensors").scales is None


@pytest.mark.slow
def test_marginal_predictions_are_the_fisher_ones_scaled_per_slot(convert_model, tmp_path):
    """The same job with ``--sensitivity fisher`` and ``marginal``: each slot's predicted KLs differ by the
    slot's saved scale, and nothing else changes."""
    files = {}
    for mode in ("fisher", "marginal"):
        out = tmp_path / f"{mode}.json"
        assert run_cli(["-i", str(convert_model), "-o", str(tmp_path / mode), "-om", str(out), *CAL,
                        "--measure", "fast", "--sensitivity", mode]) == 0
        files[mode] = json.loads(out.read_text())
    assert files["fisher"]["measurement"] == files["marginal"]["measurement"]
    scales = Sensitivity.load(tmp_path / "marginal" / "sensitivity.safetensors").scales
    assert Sensitivity.load(tmp_path / "fisher" / "sensitivity.safetensors").scales is None
    assert len(scales) == 4 and len(set(scales.values())) > 1
    for key, fisher in files["fisher"]["predicted_kl"].items():  # one slot per module: the slot's key is the module's
        assert files["marginal"]["predicted_kl"][key] == pytest.approx([scales[key] * v for v in fisher])


@pytest.mark.slow
def test_resume_with_another_sensitivity_is_refused(convert_model, tmp_path, capsys):
    job = ["-i", str(convert_model), "-o", str(tmp_path / "job"), *CAL, "--measure", "fast"]
    assert run_cli([*job, "-om", str(tmp_path / "m.json"), "--sensitivity", "fisher"]) == 0
    capsys.readouterr()
    assert run_cli([*job, "-om", str(tmp_path / "m.json"), "--sensitivity", "marginal"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sensitivity: 'fisher' (job) vs 'marginal' (now)" in err


def test_negative_kl_samples_are_a_one_line_error(convert_model, tmp_path, capsys):
    assert run_cli(["-i", str(convert_model), "-o", str(tmp_path / "job"), "--kl-samples", "-1"]) != 0
    err = capsys.readouterr().err
    assert "KL samples must be 0 (the whole vocabulary) or more" in err and "Traceback" not in err
