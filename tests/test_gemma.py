"""The Gemma-family plans against transformers: float32 logits, float16 KL, both config styles, the Gemma 3
VLM's two checkpoint layouts and its output names, and a conversion of a tiny Gemma 2 that loads back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (TINY_DIMS, make_tiny_model, randomize_weights, to_classic_style, write_bpe_tokenizer,
                      write_tokenizer)
from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.model.exl2_weights import open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plan import AttentionModule, MlpModule
from exl2core.plugins import load_config, resolve_plan
from exl2_gemma import gemma3_vlm_plan, vlm_output_name

LEGACY_LM_SOURCE, NESTED_LM_SOURCE = "language_model.model.", "model.language_model."

#: Four layers so local and global layers alternate; the window is shorter than the 48-token rows.
LAYERS = dict(num_hidden_layers=4, sliding_window=8)  # Gemma 1 must ignore the window
#: A scalar ≠ head_dim and soft caps that bite, so using the wrong one shows in the logits.
GEMMA2 = dict(LAYERS, query_pre_attn_scalar=24, attn_logit_softcapping=10.0, final_logit_softcapping=5.0)
#: Every third layer global (not Gemma 2's parity), local and global RoPE with different bases and scaling.
GEMMA3 = dict(LAYERS, query_pre_attn_scalar=24, sliding_window_pattern=3, rope_parameters={
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})
MODELS = {"gemma": ("gemma", LAYERS), "gemma2": ("gemma2", GEMMA2), "gemma3": ("gemma3_text", GEMMA3)}
#: Embeddings ×0.1: Gemma's tied head on unit-scale embeddings gives one-hot softmaxes that hide errors.
EMBED_SCALE = 0.1


def _shrink_embedding(model) -> None:
    with torch.no_grad():
        model.hf.get_input_embeddings().weight.mul_(EMBED_SCALE)
    model.hf.save_pretrained(model.path)


def _gemma3_classic_style(config_path: Path, pattern: int) -> None:
    """The config as released Gemma 3 checkpoints write it: ``rope_theta`` + ``rope_scaling`` for the
    global layers, ``rope_local_base_freq`` for the local ones, ``sliding_window_pattern``."""
    config = json.loads(config_path.read_text())
    params = config.pop("rope_parameters")
    config.pop("layer_types")
    config.pop("_sliding_window_pattern", None)
    full = dict(params["full_attention"])
    config["rope_theta"] = full.pop("rope_theta")
    kind = full.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **full}
    config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    config["sliding_window_pattern"] = pattern
    config_path.write_text(json.dumps(config, indent=2))


def _classic_style(name: str, config_path: Path) -> None:
    if name == "gemma3":
        _gemma3_classic_style(config_path, GEMMA3["sliding_window_pattern"])
        return
    to_classic_style(config_path)
    config = json.loads(config_path.read_text())
    config.pop("layer_types", None)
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def gemma_model(tmp_path_factory):
    """``gemma_model(name, style)``: a cached tiny model of MODELS[name] in the ``v5``/``classic`` style."""
    cache = {}

    def make(name: str, style: str = "v5"):
        if (name, style) not in cache:
            model_type, overrides = MODELS[name]
            model = make_tiny_model(tmp_path_factory.mktemp(f"{name}_{style}"), model_type, **overrides)
            _shrink_embedding(model)
            if style == "classic":
                _classic_style(name, model.path / "config.json")
            cache[name, style] = model
        return cache[name, style]

    return make


def _plan(source: SourceModel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_plan(source.config)


def kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("style", ["v5", "classic"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(gemma_model, name, style):
    model = gemma_model(name, style)
    source = SourceModel(model.path)
    plan = _plan(source)
    ids = model.random_ids()
    ref = model.hf_logits(ids)
    assert ref.softmax(-1).max(-1).values.mean() < 0.9, "near one-hot logits would hide errors"
    assert (forward_logits(source, plan, ids) - ref).abs().max().item() <= 1e-4
    assert kl(ref, forward_logits(source, plan, ids, dtype=torch.float16)) <= 1e-4


def test_plan_fields(gemma_model):
    plans = {name: _plan(SourceModel(gemma_model(name).path)) for name in MODELS}
    for name, plan in plans.items():
        attn = [m for m in plan.modules if isinstance(m, AttentionModule)]
        mlp = [m for m in plan.modules if isinstance(m, MlpModule)]
        assert all(m.norm.offset == 1.0 and m.activation == "gelu_tanh" for m in mlp)
        assert plan.modules[0].scale == pytest.approx(TINY_DIMS["hidden_size"] ** 0.5)
        prefix = "language_model." if name == "gemma3" else ""  # text-only Gemma 3 in the VLM layout
        assert plan.head.linears[0].source == "model.embed_tokens" and plan.head.linears[0].key == prefix + "lm_head"
        assert plan.fp32_residual == (name != "gemma")
        windows = [m.attention.sliding_window for m in attn]
        assert windows == {"gemma": [None] * 4, "gemma2": [8, None, 8, None], "gemma3": [8, 8, None, 8]}[name]
    g3 = [m.attention for m in plans["gemma3"].modules if isinstance(m, AttentionModule)]
    assert [a.rope.theta for a in g3] == [1000.0, 1000.0, 50000.0, 1000.0]
    assert g3[2].rope.kind == "linear" and "q_norm" in plans["gemma3"].modules[1].tensors
    assert g3[0].scale == pytest.approx(24 ** -0.5)
    assert plans["gemma"].modules[1].attention.scale is None


def test_text_only_gemma3_is_written_as_the_vlm_language_model(gemma_model):
    """exllamav2 0.3.2 loads Gemma3ForCausalLM as Llama: the plan names its output as the VLM's language
    model (read from the text checkpoint's names) and rewrites config.json as a VLM without a tower."""
    source = SourceModel(gemma_model("gemma3").path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = resolve_plan(source.config, tensor_names=source.keys())
    assert plan.architecture == "Gemma3ForCausalLM" and plan.lm_prefix == "language_model."
    q = plan.modules[1].linear("q_proj")
    assert (q.key, q.source) == ("language_model.model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj")
    assert plan.head.linears[0].key == "language_model.lm_head"
    assert plan.head.linears[0].source == "model.embed_tokens"
    for module in plan.modules:
        for key in module.tensors.values():
            assert source.has(key) and plan.output_name(key) == "language_model." + key
    raw = json.loads((source.path / "config.json").read_text())
    out = plan.output_config(raw)
    assert out["architectures"] == ["Gemma3ForConditionalGeneration"] and out["model_type"] == "gemma3"
    assert out["text_config"]["model_type"] == "gemma3_text" and "vision_config" not in out
    assert out["text_config"]["hidden_size"] == raw["hidden_size"]
    vlm = resolve_plan(ModelConfig.from_dict(out))  # how exl2core reads the output back
    assert [[lin.key for lin in m.linears] for m in vlm.modules] == \
        [[lin.key for lin in m.linears] for m in plan.modules]
    assert [{plan.output_name(k) for k in m.tensors.values()} for m in plan.modules] == \
        [set(m.tensors.values()) for m in vlm.modules]


def test_released_gemma3_defaults(gemma_model):
    """Released VLM configs leave head_dim (≠ hidden/heads), eps, vocab … to Gemma 3's defaults."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
                           "num_hidden_layers": 12, "num_key_value_heads": 8, "sliding_window": 1024,
                           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}
    plan = gemma3_vlm_plan(ModelConfig.from_dict(raw), "Gemma3ForConditionalGeneration")
    q = plan.modules[1].linear("q_proj")
    assert (q.in_features, q.out_features) == (3840, 16 * 256)
    assert plan.head.linears[0].out_features == 262_208
    ropes = [m.attention.rope for m in plan.modules if isinstance(m, AttentionModule)]
    assert [(r.theta, r.kind, r.factor) for r in ropes[4:6]] == [(10000.0, "default", 1.0),
                                                                 (1_000_000.0, "linear", 8.0)]
    assert plan.modules[1].norm.eps == 1e-6 and plan.modules[1].attention.scale == 256 ** -0.5
    bidirectional = json.loads(json.dumps(raw))
    bidirectional["text_config"]["use_bidirectional_attention"] = True
    with pytest.raises(Exl2Error, match="bidirectional"):
        gemma3_vlm_plan(ModelConfig.from_dict(bidirectional), "Gemma3ForConditionalGeneration")


@pytest.fixture(scope="module")
def gemma3_vlm(tmp_path_factory):
    """A tiny Gemma 3 VLM as transformers writes it, and the same weights in the nested layout."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**TINY_DIMS, **GEMMA3}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config).float().eval()
    randomize_weights(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBED_SCALE)
    legacy = tmp_path_factory.mktemp("gemma3_vlm")
    model.save_pretrained(legacy)
    write_tokenizer(legacy, TINY_DIMS["vocab_size"])
    nested = tmp_path_factory.mktemp("gemma3_vlm_nested")
    tensors = load_file(legacy / "model.safetensors")
    renamed = {(NESTED_LM_SOURCE + k[len(LEGACY_LM_SOURCE):] if k.startswith(LEGACY_LM_SOURCE)
                else "model." + k): t for k, t in tensors.items()}
    save_file(renamed, nested / "model.safetensors", metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        (nested / f).write_bytes((legacy / f).read_bytes())
    return model, legacy, nested


@pytest.mark.parametrize("layout", ["legacy", "nested"])
def test_vlm_language_model(gemma3_vlm, layout):
    hf, legacy, nested = gemma3_vlm
    source = SourceModel(legacy if layout == "legacy" else nested)
    plan = resolve_plan(source.config, tensor_names=source.keys())
    read_from = {lin.source.split("layers.")[0] for m in plan.modules[1:-2] for lin in m.linears}
    assert read_from == {LEGACY_LM_SOURCE if layout == "legacy" else NESTED_LM_SOURCE}
    assert plan.lm_prefix == "language_model." and plan.head.key == "language_model.lm_head"
    assert plan.modules[1].linear("q_proj").key == "language_model.model.layers.0.self_attn.q_proj"
    ids = torch.randint(0, TINY_DIMS["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(input_ids=ids).logits.float()
    assert (forward_logits(source, plan, ids) - ref).abs().max().item() <= 1e-4

    legacy_keys = set(SourceModel(legacy).keys())
    for module in plan.modules:
        for key in module.tensors.values():
            name = plan.output_name(key)
            assert name in legacy_keys and name.startswith(LEGACY_LM_SOURCE)
            with safe_open(str(legacy / "model.safetensors"), "pt") as f:
                assert torch.equal(f.get_tensor(name), source.tensor(key))


def test_vlm_output_names():
    assert vlm_output_name("model.language_model.norm.weight") == "language_model.model.norm.weight"
    assert vlm_output_name("model.vision_tower.vision_model.post_layernorm.weight") == \
        "vision_tower.vision_model.post_layernorm.weight"
    assert vlm_output_name("vision_tower.post_layernorm.weight") == "vision_tower.vision_model.post_layernorm.weight"
    assert vlm_output_name("multi_modal_projector.mm_input_projection_weight") == \
        "multi_modal_projector.mm_input_projection.weight"


@pytest.mark.slow
def test_convert_gemma2_loads(tmp_path):
    """Convert a tiny Gemma 2 (tied head, post-norms, soft caps) and run the EXL2 result."""
    src = tmp_path / "src"
    model = make_tiny_model(src, "gemma2", **{**GEMMA2, "num_hidden_layers": 2})
    _shrink_embedding(model)
    write_bpe_tokenizer(src, TINY_DIMS["vocab_size"])
    out = tmp_path / "exl2"
    assert main(["convert", "-i", str(src), "-o", str(tmp_path / "job"), "-mr", "2", "-ml", "64",
                 "-r", "4", "-l", "64", "-b", "4.0", "--device", "cpu", "-cf", str(out)]) == 0
    source = SourceModel(src)
    keys = set(SourceModel(out).keys())
    for module in _plan(source).modules:
        assert set(module.tensors.values()) <= keys
        for lin in module.linears:
            assert lin.key + ".q_weight" in keys and lin.key + ".weight" not in keys
    assert "lm_head.q_weight" in keys
    norm_key = "model.layers.1.post_feedforward_layernorm.weight"
    with safe_open(str(out / "output.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(norm_key), source.tensor(norm_key, torch.float16))

    exl2 = open_model(out)
    assert exl2.weights_override is not None and exl2.plan.fp32_residual
    ids = model.random_ids(seed=1)
    # 4-bit noise costs this random model ≈ 0.25; without post-norms it is ≈ 0.47, without windows ≈ 0.9.
    assert 0 < kl(model.hf_logits(ids), exl2.logits(ids)) < 0.35


def test_released_gemma3_vlm_config_without_head_counts_loads(tmp_path):
    """Released Gemma 3 VLM configs omit keys (heads, head_dim) that the plugin's defaults supply."""
    from exl2core.model.config import ModelConfig

    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34,
                           "intermediate_size": 10240}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 256)
    assert config.vocab_size == 262_208 and config.text["query_pre_attn_scalar"] == 256
