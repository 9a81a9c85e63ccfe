"""The parallel decoder block and the Cohere plugin against transformers, and a Cohere conversion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model, write_bpe_tokenizer
from exl2core.cli import main
from exl2core.model.exl2_weights import open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.modules.attention import attention_branch
from exl2core.modules.forward import module_forward
from exl2core.modules.mlp import activation, feed_forward
from exl2core.modules.norm import normalize
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.measure import measure_module
from exl2core.pipeline.runner import prepare_hessians, forward_rows
from exl2core.plan import ParallelModule
from exl2core.plugins import resolve_plan
from exl2core.quant.gptq import quantize_linear
from exl2core.quant.qparams import table_setting

MODELS = {
    "cohere": ("cohere", {}),
    "cohere-qk-norm-bias": ("cohere", {"use_qk_norm": True, "attention_bias": True, "logit_scale": 0.25}),
    "cohere-classic": ("cohere", {"style": "classic", "rope_parameters": {"rope_theta": 500.0}}),
    "cohere2-window": ("cohere2", {"sliding_window": 8, "num_hidden_layers": 4}),
    "cohere2-window-classic": ("cohere2", {"sliding_window": 8, "num_hidden_layers": 4, "style": "classic"}),
}


def _open(model):
    source = SourceModel(model.path)
    return source, resolve_plan(source.config)


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(tiny_model, name):
    model_type, kwargs = MODELS[name]
    model = tiny_model(model_type, **kwargs)
    source, plan = _open(model)
    ids = model.random_ids()
    ours = forward_logits(source, plan, ids)
    ref = model.hf_logits(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_cohere_plan_shape(tiny_model):
    model = tiny_model("cohere", use_qk_norm=True)
    _, plan = _open(model)
    kinds = [m.kind for m in plan.modules]
    assert kinds == ["embedding", "parallel", "parallel", "norm", "head"]
    layer = plan.modules[1]
    assert layer.measurement_key == "model.layers.0.parallel_decoder"
    assert [(s.key, s.table, s.roles) for s in layer.slots] == [
        ("model.layers.0.self_attn", "attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("model.layers.0.mlp", "mlp", ("gate_proj", "up_proj", "down_proj")),
    ]
    assert layer.tensors == {"input_norm": "model.layers.0.input_layernorm.weight",
                             "q_norm": "model.layers.0.self_attn.q_norm.weight",
                             "k_norm": "model.layers.0.self_attn.k_norm.weight"}
    assert {lin.name: lin.key for lin in layer.linears}["gate_proj"] == "model.layers.0.mlp.gate_proj"
    assert plan.head.linears[0].source == "model.embed_tokens"
    assert plan.head.logit_scale == pytest.approx(0.0625)


def test_cohere2_full_layers_have_no_rope(tiny_model):
    _, plan = _open(tiny_model("cohere2", sliding_window=8, num_hidden_layers=4))
    layers = [m for m in plan.modules if isinstance(m, ParallelModule)]
    assert [m.attention.sliding_window for m in layers] == [8, 8, 8, None]
    assert [m.attention.rope is None for m in layers] == [False, False, False, True]


def test_hessian_groups_share_the_normed_input(tiny_model):
    _, plan = _open(tiny_model("cohere"))
    groups = plan.modules[1].hessian_groups()
    assert groups == [["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], ["o_proj"], ["down_proj"]]


def test_capture_reports_each_input_once(tiny_model):
    """The shared input enters its Hessian once per row, and it is the norm's output."""
    model = tiny_model("cohere")
    source, plan = _open(model)
    module = plan.modules[1]
    weights = source.module_weights(module, torch.float32, "cpu")
    x = torch.randn(1, 12, model.hf.config.hidden_size, generator=torch.Generator().manual_seed(1))
    seen: list[tuple[str, torch.Tensor]] = []
    y = module_forward(module)(module, weights, x, lambda name, t: seen.append((name, t)))
    assert [name for name, _ in seen] == ["attn_in", "attn_out", "mlp_down", "attn_branch", "mlp_branch"]
    normed = normalize(x, weights["input_norm"], kind="layer", eps=module.norm.eps)
    torch.testing.assert_close(seen[0][1], normed)
    layer = model.hf.model.layers[0]
    with torch.inference_mode():
        h = layer.input_layernorm(x)
        cos, sin = model.hf.model.rotary_emb(x, torch.arange(12)[None])
        causal = torch.full((12, 12), float("-inf")).triu(1)[None, None]
        expected = x + layer.self_attn(h, (cos, sin), causal)[0] + layer.mlp(h)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_each_branch_is_measured_on_its_own_output(tiny_model):
    """exl2-format §5.4: a parallel decoder's attention and MLP slots are scored on their branch outputs
    (residual and the other branch excluded), recomputed here with the branches called directly."""
    model = tiny_model("cohere")
    source, plan = _open(model)
    module = plan.modules[1]
    weights = source.module_weights(module, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(2)
    states = HiddenStates([torch.randn(16, model.hf.config.hidden_size, generator=gen) for _ in range(2)], "cpu")
    fwd = module_forward(module)
    record, targets = measure_module(fwd, module, weights, states)
    torch.testing.assert_close(targets, forward_rows(fwd, module, weights, states))

    hessians: dict = {}
    forward_rows(fwd, module, weights, states, hessians)
    prepared = prepare_hessians(module, hessians, "cpu")
    branches = {"attn": lambda w, h: attention_branch(module, w, h),
                "mlp": lambda w, h: feed_forward(w, h, activation(module.activation), module, None)}
    for slot in module.slots:
        for row in (0, 9):
            trial = dict(weights)
            for lin in module.linears:
                if lin.role in slot.roles:
                    q = quantize_linear(weights[lin.name], prepared[lin.name],
                                        table_setting(slot.table, row, lin.role))
                    trial[lin.name] = q.weight[: lin.out_features].float()
            errors = []
            for i in range(len(states)):
                h = normalize(states.row(i), weights["input_norm"], kind="layer", eps=module.norm.eps)
                ref, out = branches[slot.table](weights, h), branches[slot.table](trial, h)
                errors.append((torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item())
            expected = 1 - sum(errors) / len(errors)
            assert record[slot.table][row]["accuracy"] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A one-layer Cohere converted at 4.0 bpw through the CLI."""
    root = tmp_path_factory.mktemp("cohere_convert")
    dims = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=500, num_hidden_layers=1)
    model = make_tiny_model(root / "src", "cohere", use_qk_norm=True, **dims)
    write_bpe_tokenizer(model.path, dims["vocab_size"])
    args = ["convert", "-i", str(model.path), "-o", str(root / "work"), "-mr", "2", "-ml", "64", "-r", "4",
            "-l", "64", "-b", "4.0", "--device", "cpu", "-cf", str(root / "out")]
    assert main(args) == 0
    return model, root


@pytest.mark.slow
def test_measurement_is_a_parallel_decoder_record(converted):
    _, root = converted
    measurement = json.loads((root / "work" / "measurement.json").read_text())["measurement"]
    record = measurement["model.layers.0.parallel_decoder"]
    assert set(record) == {"attn", "mlp"}
    assert len(record["attn"]) == 19 and len(record["mlp"]) == 17
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(record["attn"][0])
    assert {"gate_proj", "up_proj", "down_proj"} <= set(record["mlp"][0])
    strategy = json.loads((root / "work" / "job.json").read_text())["state"]["strategy"]
    assert set(strategy) == {"model.layers.0.self_attn", "model.layers.0.mlp"}


@pytest.mark.slow
def test_compiled_cohere_names_and_logits(converted):
    model, root = converted
    out = root / "out"
    with safe_open(str(out / "output.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.0.{name}.q_weight" in keys
    assert {"model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
            "model.norm.weight", "model.embed_tokens.weight", "lm_head.q_weight"} <= keys
    assert not any("post_attention_layernorm" in k for k in keys)
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(3))
    ref = model.hf_logits(ids)
    quant = open_model(out).logits(ids)
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(quant, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 0.05
