"""Mixture-of-experts: the ``moe`` forward against transformers (Mixtral, Qwen3-MoE), routed-token counts
against transformers' router, all-experts calibration, the plan's shape and refusals, and a conversion."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.modules.forward import module_forward
from exl2core.modules.linear import apply_linear
from exl2core.modules.moe import UnderRoutedExpertWarning, down_input, expert_token_counts
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.runner import embed_rows, forward_rows
from exl2core.plan import HeadModule, MoeModule, NormModule
from exl2core.plugins import resolve_plan
from exl2core.quant.pack import dequantize
from exl2core.quant.qparams import pad32, table_setting

from conftest import make_tiny_model, write_bpe_tokenizer

MOE_DIMS = dict(num_experts_per_tok=2, intermediate_size=64)
QWEN3_DIMS = dict(num_experts=4, moe_intermediate_size=64, **MOE_DIMS)
#: test id → (model_type, config overrides) of the tiny models (4 experts, top-2, hidden 64, 2 layers).
MODELS = {
    "mixtral": ("mixtral", dict(num_local_experts=4, **MOE_DIMS)),
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True, **QWEN3_DIMS)),
    "qwen3_moe_unnormed": ("qwen3_moe", dict(norm_topk_prob=False, **QWEN3_DIMS)),
}


def tiny_moe(tiny_model, name: str):
    model_type, kwargs = MODELS[name]
    return tiny_model(model_type, **kwargs)


@pytest.fixture(scope="module", params=list(MODELS))
def moe_model(request, tiny_model):
    return tiny_moe(tiny_model, request.param)


@pytest.fixture
def mixtral(tiny_model):
    return tiny_moe(tiny_model, "mixtral")


def plan_of(path: Path):
    """Source and plan; the norm_topk_prob = false warning of the plugin is expected here."""
    source = SourceModel(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Qwen3MoeForCausalLM with norm_topk_prob")
        return source, resolve_plan(source.config)


def kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_fp32_logits_match_transformers(moe_model):
    source, plan = plan_of(moe_model.path)
    ids = moe_model.random_ids()
    diff = (forward_logits(source, plan, ids) - moe_model.hf_logits(ids)).abs().max().item()
    assert diff <= 1e-4


#: KL bound against transformers' float32 logits. bfloat16 hidden states move some tokens' router
#: logits across a top-k boundary (transformers' own bfloat16 run flips as many), hence the wider bound.
HALF_KL = {torch.float16: 1e-4, torch.bfloat16: 5e-3}


@pytest.mark.parametrize("dtype", list(HALF_KL))
def test_low_precision_logits_close_to_transformers(moe_model, dtype):
    source, plan = plan_of(moe_model.path)
    ids = moe_model.random_ids()
    assert kl(moe_model.hf_logits(ids), forward_logits(source, plan, ids, dtype=dtype)) <= HALF_KL[dtype]


def run_moe_blocks(source, plan, ids: torch.Tensor) -> list[tuple[object, dict, list[torch.Tensor]]]:
    """Run the plan's modules the way the pipeline does (one row at a time through ``forward_rows``)
    and return, for every MoE block, ``(module, Hessians, outputs)``."""
    states = HiddenStates(embed_rows(source, plan, ids), "cpu")
    blocks = []
    for module in plan.modules[1:]:
        if isinstance(module, (NormModule, HeadModule)):
            break
        hessians = {}
        weights = source.module_weights(module, torch.float32, "cpu")
        outputs = forward_rows(module_forward(module), module, weights, states, hessians)
        if isinstance(module, MoeModule):
            blocks.append((module, hessians, outputs))
        states = states.replaced(outputs)
    return blocks


def hf_expert_counts(model, ids: torch.Tensor) -> list[list[int]]:
    """Per layer, how many tokens transformers' router sends to each expert."""
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.inference_mode():
            model(input_ids=ids)
            counts = []
            for i, layer in enumerate(model.model.layers):
                _, _, chosen = layer.mlp.gate(inputs[i])
                counts.append(torch.bincount(chosen.flatten(), minlength=layer.mlp.gate.num_experts).tolist())
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def test_expert_token_counts_match_transformers_router(moe_model):
    source, plan = plan_of(moe_model.path)
    ids = moe_model.random_ids(batch=3, length=40, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderRoutedExpertWarning)
        blocks = run_moe_blocks(source, plan, ids)
    ours = [expert_token_counts(hessians, module) for module, hessians, _ in blocks]
    assert ours == hf_expert_counts(moe_model.hf, ids)
    assert all(sum(c) == ids.numel() * 2 for c in ours)
    for module, hessians, _ in blocks:
        shared = hessians["moe_in"]
        assert shared.num_batches == len(ids)
        for e, n in enumerate(expert_token_counts(hessians, module)):
            assert (down_input(e) in hessians) == (n > 0)


def first_two_experts(module, weights, x):
    """A plugin's routing: every token to experts 0 and 1 with weights 0.25 and 0.75."""
    scores = torch.zeros(x.shape[0], module.num_experts)
    scores[:, 0], scores[:, 1] = 0.25, 0.75
    return scores


def routed_by(plan, routing):
    return replace(plan, modules=tuple(replace(m, routing=routing) if isinstance(m, MoeModule) else m
                                       for m in plan.modules))


def test_custom_routing_and_all_experts_mode(mixtral, monkeypatch):
    source, plan = plan_of(mixtral.path)
    plan = routed_by(plan, first_two_experts)
    ids = mixtral.random_ids(batch=2, length=24)
    with pytest.warns(UnderRoutedExpertWarning) as caught:
        routed = run_moe_blocks(source, plan, ids)
    assert {str(w.message).split(" got")[0] for w in caught} == {
        f"model.layers.{i}: expert {e}" for i in (0, 1) for e in (2, 3)}
    module, hessians, outputs = routed[0]
    assert expert_token_counts(hessians, module) == [ids.numel(), ids.numel(), 0, 0]
    assert down_input(2) not in hessians and down_input(3) not in hessians

    weights = source.module_weights(module, torch.float32, "cpu")
    x = torch.randn(1, 5, 64)
    h = torch.nn.functional.rms_norm(x, (64,), weights["input_norm"], module.norm.eps)

    def expert(e):
        inner = torch.nn.functional.silu(apply_linear(weights, f"experts.{e}.w1", h))
        return apply_linear(weights, f"experts.{e}.w2", inner * apply_linear(weights, f"experts.{e}.w3", h))

    expected = x + 0.25 * expert(0) + 0.75 * expert(1)
    assert torch.allclose(module_forward(module)(module, weights, x), expected, atol=1e-5)

    monkeypatch.setenv("EXL2_MOE_ALL_EXPERTS", "1")
    source, plan = plan_of(mixtral.path)
    plan = routed_by(plan, first_two_experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderRoutedExpertWarning)
        everything = run_moe_blocks(source, plan, ids)
    for (module, hessians, outputs), (_, routed_hessians, routed_outputs) in zip(everything, routed):
        assert module.all_experts_hessian
        assert all(torch.equal(a, b) for a, b in zip(outputs, routed_outputs))
        assert expert_token_counts(hessians, module) == [ids.numel(), ids.numel(), 0, 0]
        for e in range(4):
            assert hessians[down_input(e)].num_batches == len(ids)
            assert hessians[down_input(e)].matrix.diagonal().min() > 0
        assert torch.allclose(hessians[down_input(0)].matrix, routed_hessians[down_input(0)].matrix)


def test_all_experts_mode_keeps_the_output(tiny_model, monkeypatch):
    model = tiny_moe(tiny_model, "qwen3_moe")
    ids = model.random_ids(batch=2, length=32, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderRoutedExpertWarning)
        routed = run_moe_blocks(*plan_of(model.path), ids)
    monkeypatch.setenv("EXL2_MOE_ALL_EXPERTS", "yes")
    everything = run_moe_blocks(*plan_of(model.path), ids)
    for (module, hessians, outputs), (_, routed_hessians, routed_outputs) in zip(everything, routed):
        assert all(torch.equal(a, b) for a, b in zip(outputs, routed_outputs))
        assert expert_token_counts(hessians, module) == expert_token_counts(routed_hessians, module)
        assert all(hessians[down_input(e)].num_batches == len(ids) for e in range(4))


def test_mixtral_plan_names_and_sharing(mixtral):
    _, plan = plan_of(mixtral.path)
    moe = [m for m in plan.modules if isinstance(m, MoeModule)]
    assert [m.key for m in moe] == ["model.layers.0", "model.layers.1"]
    module = moe[1]
    assert module.mode == "block_sparse_moe" and module.measurement_key == "model.layers.1.block_sparse_moe"
    assert [(s.key, s.table, s.roles) for s in module.slots] == \
        [("model.layers.1.block_sparse_moe", "mlp", ("w1", "w3", "w2"))]
    assert module.tensors == {"input_norm": "model.layers.1.post_attention_layernorm.weight",
                              "router": "model.layers.1.block_sparse_moe.gate.weight"}
    assert [lin.key for lin in module.linears[:3]] == [
        f"model.layers.1.block_sparse_moe.experts.0.{w}" for w in ("w1", "w3", "w2")]
    groups = module.hessian_groups()
    assert groups[0] == [f"experts.{e}.{w}" for e in range(4) for w in ("w1", "w3")]
    assert groups[1:] == [[f"experts.{e}.w2"] for e in range(4)]
    assert module.numel() == 4 * 3 * 64 * 64


def test_qwen3_moe_plan_names(tiny_model):
    _, plan = plan_of(tiny_moe(tiny_model, "qwen3_moe").path)
    attn, module = plan.modules[1], plan.modules[2]
    assert attn.tensors["q_norm"] == "model.layers.0.self_attn.q_norm.weight"
    assert module.tensors["router"] == "model.layers.0.mlp.gate.weight"
    assert module.slots[0].key == "model.layers.0.block_sparse_moe"
    assert {(lin.role, lin.key) for lin in module.linears if ".3." in lin.name} == {
        ("w1", "model.layers.0.mlp.experts.3.gate_proj"), ("w3", "model.layers.0.mlp.experts.3.up_proj"),
        ("w2", "model.layers.0.mlp.experts.3.down_proj")}
    assert module.renormalize is True


def qwen3_config(**changes) -> ModelConfig:
    raw = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 4,
           "intermediate_size": 64, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
           "norm_topk_prob": True, "vocab_size": 300, **changes}
    return ModelConfig.from_dict(raw)


@pytest.mark.parametrize("changes, message", [
    ({"mlp_only_layers": [1]}, r"dense layers \[1\]"),
    ({"decoder_sparse_step": 2}, r"dense layers \[0, 2\]"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok must be between 1 and 4"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unsupported_configs_are_refused(changes, message):
    with pytest.raises(Exl2Error, match=message):
        resolve_plan(qwen3_config(**changes))


def test_unnormalised_routing_warns_about_exllamav2():
    with pytest.warns(UserWarning, match="renormalises the top-k routing weights anyway"):
        plan = resolve_plan(qwen3_config(norm_topk_prob=False))
    assert plan.modules[2].renormalize is False


def test_bad_all_experts_setting(monkeypatch):
    monkeypatch.setenv("EXL2_MOE_ALL_EXPERTS", "sometimes")
    with pytest.raises(Exl2Error, match="EXL2_MOE_ALL_EXPERTS='sometimes'"):
        resolve_plan(qwen3_config())


def test_plugins_command_lists_mixtral(capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("mixtral "))
    assert "exl2_mixtral" in lines[at]
    assert "MixtralForCausalLM" in lines[at + 1] and "Qwen3MoeForCausalLM" in lines[at + 1]


@pytest.mark.slow
def test_convert_tiny_mixtral(tmp_path):
    model = make_tiny_model(tmp_path / "src", "mixtral", num_local_experts=4, num_hidden_layers=1, **MOE_DIMS)
    write_bpe_tokenizer(model.path, model.vocab_size)
    out = tmp_path / "exl2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnderRoutedExpertWarning)
        assert main(["convert", "-i", str(model.path), "-o", str(tmp_path / "job"), "-cf", str(out),
                     "-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "-b", "4.0", "--device", "cpu"]) == 0
    measurement = json.loads((tmp_path / "job" / "measurement.json").read_text())["measurement"]
    records = measurement["model.layers.0.block_sparse_moe"]
    assert len(records) == 17 and all(set(r) == {"accuracy", "total_bits", "w1", "w3", "w2"} for r in records)
    row0 = sum(table_setting("mlp", 0, role).total_bits(k, pad32(n), False)
               for role, k, n in (("w1", 64, 64), ("w3", 64, 64), ("w2", 64, 64)))
    assert records[0]["total_bits"] == 4 * row0
    notes = json.loads((tmp_path / "job" / "job.json").read_text())["state"]["calibration_notes"]
    counts = notes["model.layers.0.block_sparse_moe"][0]
    assert counts.startswith("tokens routed per expert: [")
    assert sum(json.loads(counts.split(": ", 1)[1])) == 4 * 64 * 2  # rows × tokens × top-k

    handle = safe_open(str(out / "output.safetensors"), "pt")
    keys = set(handle.keys())
    prefix = "model.layers.0.block_sparse_moe"
    assert handle.get_tensor(prefix + ".gate.weight").dtype == torch.float16
    for e in range(4):
        for w in ("w1", "w3", "w2"):
            expert = f"{prefix}.experts.{e}.{w}"
            assert f"{expert}.q_weight" in keys and f"{expert}.weight" not in keys
    assert "model.layers.0.post_attention_layernorm.weight" in keys

    source = SourceModel(model.path)
    plan = resolve_plan(source.config)

    def dequantized(module):
        return {lin.name: dequantize({s: handle.get_tensor(f"{lin.key}.{s}") for s in
                                      ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")}
                                     )[: lin.out_features] for lin in module.linears}

    ids = model.random_ids(batch=2, length=32, seed=5)
    ref = forward_logits(source, plan, ids)
    assert kl(ref, forward_logits(source, plan, ids, weights_override=dequantized)) < 0.05


def test_resuming_with_another_all_experts_setting_is_refused(tiny_model, monkeypatch):
    """The option is read from the environment, so the job fingerprints the plan it started with."""
    from exl2core.pipeline.convert import plan_digest

    source = SourceModel(tiny_model("mixtral", **MOE_DIMS).path)
    before = plan_digest(resolve_plan(source.config))
    assert plan_digest(resolve_plan(source.config)) == before
    monkeypatch.setenv("EXL2_MOE_ALL_EXPERTS", "1")
    assert plan_digest(resolve_plan(source.config)) != before


def test_gemmoe_is_mixtral_with_gemma_numerics(tiny_model, tmp_path):
    """GemMoE (remote code only), as exllamav2 0.3.2 runs it: Mixtral's layout and routing with RMSNorm
    weights stored as w − 1, the embedding scaled by √hidden, GELU(tanh) experts and the tied head. The
    reference is transformers' Mixtral with those numerics (its norms 1 + w, its input embeddings scaled)."""
    from conftest import GEMMOE_AS_MIXTRAL, mixtral_as_gemmoe

    model = tiny_model("mixtral", **GEMMOE_AS_MIXTRAL)
    for f in model.path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    mixtral_as_gemmoe(tmp_path)
    source, plan = plan_of(tmp_path)
    moe = plan.modules[2]
    assert plan.architecture == "GemmoeForCausalLM" and moe.norm.offset == 1.0 and moe.activation == "gelu_tanh"
    assert plan.head.linears[0].source == "model.embed_tokens" and moe.renormalize
    ids = model.random_ids()
    hidden = model.hf.config.hidden_size
    with torch.inference_mode():
        expected = model.hf(inputs_embeds=model.hf.model.embed_tokens(ids) * hidden ** 0.5).logits.float()
    assert (forward_logits(source, plan, ids) - expected).abs().max().item() <= 1e-4
