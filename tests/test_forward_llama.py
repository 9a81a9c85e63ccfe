"""The reference forward and the llama plugin against transformers, plus the building blocks alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig, RopeSpec
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.modules.attention import attend, attend_explicit
from exl2core.modules.forward import KINDS, module_forward, module_tail, register_kind
from exl2core.modules.norm import normalize
from exl2core.modules.rope import apply_rope, attention_factor, inv_freq, rope_tables
from exl2core.plan import AttentionModule, HeadModule, Module
from exl2core.plugins import resolve_plan

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
GRANITE = dict(embedding_multiplier=4.0, attention_multiplier=0.0625, residual_multiplier=0.22,
               logits_scaling=8.0)
#: GPT-2's own keys (n_inner), and the generic ones TINY_DIMS sets made consistent with them.
GPT = dict(num_key_value_heads=4, intermediate_size=256, n_inner=256, activation_function="gelu_new")

MODELS = {
    "llama": ("llama", {}),
    "llama-tied-classic": ("llama", {"tie_word_embeddings": True, "style": "classic"}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True, "style": "classic"}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3}),
    "llama3-rope-classic": ("llama", {"rope_parameters": LLAMA3, "style": "classic"}),
    "linear-rope-classic": ("llama", {"rope_parameters": LINEAR, "style": "classic"}),
    "mistral-window": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-classic": ("qwen2", {"tie_word_embeddings": True, "style": "classic"}),
    # Qwen3: heads × head_dim (4 × 32) ≠ hidden_size (64), so a head_dim taken from hidden / heads would show
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3-tied-bias-classic": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True, "attention_bias": True,
                                          "style": "classic"}),
    # Phi-3: fused qkv_proj and gate_up_proj, split by rows; partial rotary as in Phi-4-mini
    "phi3": ("phi3", {"pad_token_id": 0, "eos_token_id": 2}),
    # Granite: every multiplier ≠ 1 (attention_multiplier ≠ head_dim^-½), as in granite-3.x
    "granite": ("granite", GRANITE),
    "granite-tied-bias-classic": ("granite", {**GRANITE, "tie_word_embeddings": True, "attention_bias": True,
                                              "style": "classic"}),
    # Starcoder2: LayerNorm with bias, biases everywhere, ungated c_fc / c_proj, tied head by default
    "starcoder2": ("starcoder2", {"norm_epsilon": 1e-4}),
    "starcoder2-untied-window": ("starcoder2", {"tie_word_embeddings": False, "sliding_window": 16}),
    # GLM-4: post-norms, interleaved RoPE on half of each head, q/k/v bias, fused gate_up_proj
    "glm4": ("glm4", {"pad_token_id": 0, "eos_token_id": 2}),
    "glm4-no-bias-full-rotary-classic": ("glm4", {"pad_token_id": 0, "eos_token_id": 2, "attention_bias": False,
                                                  "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                                      "partial_rotary_factor": 1.0},
                                                  "style": "classic"}),
    # GPT-2 (Conv1D weights, fused c_attn, learned positions) and GPTBigCode (multi-query c_attn)
    "gpt2": ("gpt2", GPT),
    "gpt_bigcode": ("gpt_bigcode", {**GPT, "num_key_value_heads": 1, "multi_query": True}),
    "phi3-partial-rotary-tied": ("phi3", {"pad_token_id": 0, "eos_token_id": 2, "partial_rotary_factor": 0.5,
                                         "tie_word_embeddings": True}),
}


def _half_dtype() -> torch.dtype:
    """float16 where this CPU build can multiply it, else bfloat16."""
    try:
        F.linear(torch.ones(1, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


def _kl(reference: torch.Tensor, ours: torch.Tensor) -> float:
    """Mean over tokens of KL(reference ‖ ours)."""
    p = torch.log_softmax(reference.float(), -1)
    q = torch.log_softmax(ours.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def _open(model):
    source = SourceModel(model.path)
    return source, resolve_plan(source.config)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(tiny_model, name):
    model_type, kwargs = MODELS[name]
    model = tiny_model(model_type, **kwargs)
    source, plan = _open(model)
    ids = model.random_ids()
    reference = model.hf_logits(ids)
    ours = forward_logits(source, plan, ids)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape == (2, 48, 300)
    assert (ours - reference).abs().max().item() <= 1e-4
    half = _half_dtype()
    assert _kl(model.hf_logits(ids, half), forward_logits(source, plan, ids, dtype=half)) <= 1e-4


def _with_attention(plan, **changes):
    """``plan`` with ``changes`` to every attention module's parameters."""
    return replace(plan, modules=tuple(replace(m, attention=replace(m.attention, **changes))
                                       if isinstance(m, AttentionModule) else m for m in plan.modules))


def test_window_and_rope_scaling_change_the_logits(tiny_model):
    """The match above is not luck: dropping the window or the scaling breaks it."""
    mistral = tiny_model("mistral", sliding_window=16)
    source, plan = _open(mistral)
    ids = mistral.random_ids()
    assert plan.modules[1].attention.sliding_window == 16
    wrong = forward_logits(source, _with_attention(plan, sliding_window=None), ids)
    assert (wrong - mistral.hf_logits(ids)).abs().max().item() > 1e-2

    scaled = tiny_model("llama", rope_parameters=LLAMA3)
    source, plan = _open(scaled)
    assert plan.modules[1].attention.rope.kind == "llama3"
    wrong = forward_logits(source, _with_attention(plan, rope=RopeSpec()), ids)
    assert (wrong - scaled.hf_logits(ids)).abs().max().item() > 1e-2


def test_plan_describes_the_architecture(tiny_model):
    source, plan = _open(tiny_model("qwen2", tie_word_embeddings=True, style="classic"))
    kinds = [m.kind for m in plan.modules]
    assert kinds == ["embedding"] + ["attention", "mlp"] * 2 + ["norm", "head"]
    attn, mlp = plan.modules[3], plan.modules[4]
    assert attn.key == mlp.key == "model.layers.1"
    assert (attn.measurement_key, mlp.measurement_key) == ("model.layers.1.self_attn", "model.layers.1.mlp")
    assert [(lin.name, lin.bias, lin.input) for lin in attn.linears] == [
        ("q_proj", True, "attn_in"), ("k_proj", True, "attn_in"), ("v_proj", True, "attn_in"),
        ("o_proj", False, "attn_out")]
    assert attn.linear("k_proj").key == "model.layers.1.self_attn.k_proj"
    assert attn.linear("k_proj").out_features == 32
    assert mlp.slots[0].roles == ("gate_proj", "up_proj", "down_proj")
    assert plan.head.linears[0].source == "model.embed_tokens" and plan.head.linears[0].key == "lm_head"
    assert plan.head.mode == "linear" and plan.modules[-2].key == "model.norm"
    assert all(source.has(key) for m in plan.modules for key in m.tensors.values())
    assert all(source.has(lin.source + ".weight") for m in plan.modules for lin in m.linears)


def test_model_type_and_plugin_name_resolve(tiny_llama):
    config = ModelConfig.from_dict({**SourceModel(tiny_llama.path).config.raw, "architectures": ["MyLlama"]})
    assert resolve_plan(config).architecture == "llama"
    assert resolve_plan(SourceModel(tiny_llama.path).config, "llama").architecture == "LlamaForCausalLM"


def test_capture_reports_each_linear_input_once(tiny_llama):
    """The captured activations are exactly what transformers' q_proj, o_proj, up and down receive."""
    source, plan = _open(tiny_llama)
    ids = tiny_llama.random_ids(batch=1, length=32)
    layer = tiny_llama.hf.model.layers[1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args[0].detach()))
             for n, mod in [("attn_in", layer.self_attn.q_proj), ("attn_out", layer.self_attn.o_proj),
                            ("mlp_in", layer.mlp.up_proj), ("mlp_down", layer.mlp.down_proj)]]
    tiny_llama.hf_logits(ids)
    for hook in hooks:
        hook.remove()

    captured: list[tuple[str, torch.Tensor]] = []
    x = ids
    for module in plan.modules[:5]:
        weights = source.module_weights(module, torch.float32, "cpu")
        capture = (lambda n, t: captured.append((n, t))) if module.key == "model.layers.1" else None
        x = module_forward(module)(module, weights, x, capture)
    assert [n for n, _ in captured] == ["attn_in", "attn_out", "mlp_in", "mlp_down"]
    for n, t in captured:
        assert (t - seen[n]).abs().max().item() <= 1e-5, n


@pytest.mark.parametrize("model_type, kwargs", [
    ("llama", {}), ("granite", GRANITE), ("glm4", {"pad_token_id": 0, "eos_token_id": 2}),
    ("cohere", {"use_qk_norm": True}), ("gemma2", {"query_pre_attn_scalar": 24, "sliding_window": 16})])
@pytest.mark.parametrize("half", [False, True])
def test_tails_are_the_rest_of_the_forward_bit_for_bit(tiny_model, model_type, kwargs, half):
    """Given the inputs a block's later linears received, its kind's tail gives exactly its forward's
    output (post-norms, residual multipliers, parallel branches, the float16 clamp included)."""
    source, plan = _open(tiny_model(model_type, **kwargs))
    dtype = _half_dtype() if half else torch.float32
    x = tiny_model(model_type, **kwargs).random_ids(batch=1, length=32)
    tails = 0
    for module in plan.modules[:-2]:
        weights = source.module_weights(module, dtype, "cpu")
        inputs = {lin.input for lin in module.linears}
        captured: dict[str, torch.Tensor] = {}
        y = module_forward(module)(module, weights, x, lambda n, t: captured.setdefault(n, t) if n in inputs else None)
        tail = module_tail(module)
        if module.linears:
            later = dict(list(captured.items())[1:])
            assert tail is not None and later, module.key
            assert torch.equal(tail(module, weights, x, later), y), module.key
            tails += 1
        x = y
    assert tails == sum(1 for m in plan.modules if m.slots)


def test_weights_override_replaces_source_tensors(tiny_llama):
    source, plan = _open(tiny_llama)
    ids = tiny_llama.random_ids(batch=1)
    reference = forward_logits(source, plan, ids)
    head = source.tensor("lm_head.weight")
    doubled = forward_logits(source, plan, ids,
                             weights_override=lambda m: {"lm_head": 2 * head} if m.kind == "head" else None)
    assert torch.allclose(doubled, 2 * reference, atol=1e-5)


def test_embedding_clamps_out_of_range_ids(tiny_llama):
    source, plan = _open(tiny_llama)
    module = plan.modules[0]
    weights = source.module_weights(module, torch.float32, "cpu")
    out = module_forward(module)(module, weights, torch.tensor([[-1, 5, 300, 10**6]]))
    table = weights["embed"]
    assert torch.equal(out[0], torch.stack([table[0], table[5], table[0], table[0]]))
    module = replace(module, scale=8.0)
    assert torch.equal(module_forward(module)(module, weights, torch.tensor([[5]]))[0, 0], table[5] * 8.0)


def test_head_scale_softcap_and_vocab_slice():
    module = HeadModule(key="lm_head", mode="linear", vocab_size=5, softcap=3.0, logit_scale=0.5)
    weights = {"lm_head": torch.randn(32, 8, dtype=torch.float16)}
    x = torch.randn(1, 4, 8, dtype=torch.float16)
    out = module_forward(module)(module, weights, x)
    expected = torch.tanh((x @ weights["lm_head"].T).float()[..., :5] * 0.5 / 3.0) * 3.0
    assert out.dtype == torch.float32 and out.shape == (1, 4, 5)
    assert torch.allclose(out, expected, atol=1e-3)


@dataclass(frozen=True, kw_only=True)
class RwkvModule(Module):
    kind = "test.rwkv"
    TENSOR_ROLES = ("time_mix",)

    decay: float = 0.5


def test_a_plugin_kind_is_registered_once(monkeypatch):
    module = RwkvModule(key="model.layers.0", mode="rwkv", tensors={"time_mix": "model.layers.0.time_mix"})
    with pytest.raises(Exl2Error, match="no forward for module kind RwkvModule"):
        module_forward(module)
    monkeypatch.setattr("exl2core.modules.forward.KINDS", dict(KINDS))

    def forward(m, w, x, capture=None):
        return x + m.decay

    register_kind(RwkvModule, forward)
    register_kind(RwkvModule, forward)  # the same binding again is harmless
    assert module_forward(module)(module, {}, torch.zeros(1)).item() == 0.5
    with pytest.raises(Exl2Error, match="already has a forward"):
        register_kind(RwkvModule, lambda m, w, x, capture=None: x)


def test_misspelt_tensor_roles_are_refused():
    with pytest.raises(Exl2Error, match="no tensor role tim_mix"):
        RwkvModule(key="model.layers.0", mode="rwkv", tensors={"tim_mix": "model.layers.0.time_mix"})


def test_norms_match_torch():
    x = torch.randn(2, 5, 64, dtype=torch.float16)
    w, b = torch.randn(64), torch.randn(64)
    layer = normalize(x, w, b, kind="layer", eps=1e-5)
    assert layer.dtype == torch.float16
    # float16 output: half an ulp is |v| · 2^-11, beyond atol alone for |v| > 4 (1 run in 20 failed)
    assert torch.allclose(layer.float(), F.layer_norm(x.float(), (64,), w, b, 1e-5), atol=2e-3, rtol=1e-3)
    rms = normalize(x, w, kind="rms", eps=1e-6, offset=1.0, out_dtype=torch.float32)
    expected = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (w + 1)
    assert torch.allclose(rms, expected, atol=1e-5)
    with pytest.raises(Exl2Error):
        normalize(x, w, b, kind="rms")


@pytest.mark.parametrize("window", [None, 5])
def test_fused_and_explicit_attention_agree(window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 16, generator=g)
    k, v = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    fused = attend(q, k, v, scale=0.25, window=window)
    k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    explicit = attend_explicit(q, k2, v2, scale=0.25, window=window)
    assert torch.allclose(fused, explicit, atol=1e-5)
    # a soft cap far above the scores is the identity; a tight one is not
    assert torch.allclose(attend(q, k, v, scale=0.25, window=window, softcap=1e4), fused, atol=1e-5)
    assert not torch.allclose(attend(q, k, v, scale=0.25, window=window, softcap=0.5), fused, atol=1e-3)
    # query 11 with window 5 sees keys 7..11 only: changing key 6 must not move it
    shifted = v.clone()
    shifted[:, :, 6] += 10
    moved = (attend(q, k, shifted, scale=0.25, window=window) - fused)[:, :, 11].abs().max().item()
    assert (moved == 0) if window else (moved > 1e-3)


def _hf_rope(rope_parameters: dict, seq_len: int | None = None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=128,
                         rope_parameters=dict(rope_parameters))
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, None, seq_len)


@pytest.mark.parametrize("params", [
    LINEAR,
    {**LLAMA3, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 5e5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e4,
     "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0},
], ids=["linear", "llama3", "yarn", "yarn-attention-factor"])
def test_rope_frequencies_match_transformers(params):
    spec = RopeSpec.from_dict(params, 10000.0)
    expected, factor = _hf_rope(params)
    assert torch.allclose(inv_freq(spec, 64, 100, max_position=128), expected, rtol=1e-6)
    assert math.isclose(attention_factor(spec), factor, rel_tol=1e-6)


def test_rope_tables_are_the_rounded_cosines_of_the_float32_angles():
    """From the C library, the tables are the same in every process (torch's cos/sin kernels are not: a few
    processes in a hundred take another code path)."""
    spec = RopeSpec.from_dict({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                              10000.0)
    cos, sin = rope_tables(spec, 64, 512, max_position=128)
    angles = torch.outer(torch.arange(512, dtype=torch.float32), inv_freq(spec, 64, 512, 128)).repeat(1, 2)
    scale = attention_factor(spec)
    assert scale != 1.0
    for table, f in ((cos, math.cos), (sin, math.sin)):
        expected = torch.tensor([f(a) * scale for a in angles.flatten().tolist()], dtype=torch.float64)
        assert torch.equal(table.flatten(), expected.float())


def test_dynamic_rope_grows_the_base_past_max_positions():
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    spec = RopeSpec.from_dict(params, 10000.0)
    assert torch.allclose(inv_freq(spec, 64, 100, max_position=128), _hf_rope(params)[0])
    assert torch.allclose(inv_freq(spec, 64, 300, max_position=128), _hf_rope(params, 300)[0], rtol=1e-6)
    assert not torch.allclose(inv_freq(spec, 64, 300, max_position=128), inv_freq(spec, 64, 100, 128))


def test_ntk_alpha_scales_the_base():
    spec = RopeSpec.from_dict({"type": "dynamic", "alpha": 4.0}, 10000.0)
    assert spec.kind == "ntk_alpha"
    freqs = inv_freq(spec, 64)
    assert math.isclose(freqs[1].item(), (10000.0 * 4.0 ** (64 / 62)) ** (-2 / 64), rel_tol=1e-6)
    assert freqs[0].item() == 1.0


def test_gptj_rotation_matches_cohere():
    from transformers import CohereConfig
    from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding, apply_rotary_pos_emb

    config = CohereConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 500.0})
    q, k = torch.randn(1, 4, 10, 16), torch.randn(1, 4, 10, 16)
    cos, sin = CohereRotaryEmbedding(config)(q, torch.arange(10)[None])
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = rope_tables(RopeSpec(theta=500.0), 16, 10, "gptj")
    assert torch.allclose(apply_rope(q, ours_cos, ours_sin, "gptj"), expected_q, atol=1e-5)
    assert torch.allclose(apply_rope(k, ours_cos, ours_sin, "gptj"), expected_k, atol=1e-5)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_partial_rotary_leaves_the_tail_alone(style):
    x = torch.randn(1, 2, 10, 16)
    cos, sin = rope_tables(RopeSpec(partial_rotary_factor=0.5), 16, 10, style)
    full_cos, full_sin = rope_tables(RopeSpec(), 8, 10, style)
    assert cos.shape == (10, 8)
    out = apply_rope(x, cos, sin, style)
    assert torch.equal(out[..., 8:], x[..., 8:])
    # as in transformers, the rotated channels use the frequencies of a rotary-dim-wide head
    assert torch.allclose(out[..., :8], apply_rope(x[..., :8], full_cos, full_sin, style))
    second = 1 if style == "neox" else 2
    assert torch.allclose(cos[1, second], torch.cos(torch.tensor(10000.0 ** (-2 / 8))))


def test_gpt2_original_layout_and_positions(tiny_model, tmp_path):
    """The original GPT-2 checkpoints name their tensors without ``transformer.`` (``h.0.attn.c_attn`` …);
    rows longer than the learned positions are refused in one line."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("gpt2", **GPT)
    for f in model.path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model.path / "model.safetensors")
    save_file({k.removeprefix("transformer."): t for k, t in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    source = SourceModel(tmp_path)
    plan = resolve_plan(source.config, tensor_names=source.keys())
    assert plan.modules[1].linear("q_proj").source == "h.0.attn.c_attn"
    assert plan.output_name("h.0.ln_1.weight") == "model.layers.0.ln_1.weight"
    ids = model.random_ids()
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() <= 1e-4
    long = torch.zeros(1, 257, dtype=torch.long)  # TINY_DIMS: 256 positions
    with pytest.raises(Exl2Error, match="exceed the model's 256 learned positions"):
        forward_logits(source, plan, long)


def _rewritten(model, directory, rewrite):
    """A copy of ``model``'s checkpoint in ``directory``, rewritten into a remote-code layout by ``rewrite``,
    and its source and plan."""
    for f in model.path.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    rewrite(directory)
    source = SourceModel(directory)
    return source, resolve_plan(source.config, tensor_names=source.keys())


def test_minicpm_is_granite_under_other_keys(tiny_model, tmp_path):
    """MiniCPM (remote code only) is the Granite forward with scale_emb, scale_depth / √layers and
    hidden / dim_model_base: a tiny Granite rewritten as a MiniCPM checkpoint gives transformers' logits."""
    from conftest import MINICPM_AS_GRANITE, granite_as_minicpm

    model = tiny_model("granite", **MINICPM_AS_GRANITE)
    source, plan = _rewritten(model, tmp_path, granite_as_minicpm)
    assert plan.architecture == "MiniCPMForCausalLM" and plan.modules[0].scale == 4.0
    assert plan.head.logit_scale == 1 / 8 and plan.modules[1].residual_scale == pytest.approx(0.22)
    ids = model.random_ids()
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() <= 1e-4


def test_orion_is_a_stablelm_without_partial_rotary(tiny_model, tmp_path):
    """Orion (remote code only) is Llama with LayerNorms: a tiny StableLM with full rotary and no q/k/v bias,
    rewritten as an Orion checkpoint, gives transformers' StableLM logits."""
    from conftest import ORION_AS_STABLELM, stablelm_as_orion

    model = tiny_model("stablelm", **ORION_AS_STABLELM)
    source, plan = _rewritten(model, tmp_path, stablelm_as_orion)
    assert plan.architecture == "OrionForCausalLM" and plan.modules[1].norm.kind == "layer"
    assert plan.modules[1].tensors["input_norm.bias"] == "model.layers.0.input_layernorm.bias"
    ids = model.random_ids()
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() <= 1e-4


def test_internlm2_is_llama_with_wqkv(tiny_model, tmp_path):
    """InternLM2 (remote code only) is Llama with other names and q/k/v packed per key/value head: a tiny
    Llama rewritten as an InternLM2 checkpoint gives transformers' Llama logits."""
    from conftest import llama_as_internlm2

    model = tiny_model("llama")
    source, plan = _rewritten(model, tmp_path, llama_as_internlm2)
    k = plan.modules[1].linear("k_proj")
    assert (k.key, k.source, k.rows) == ("model.layers.0.self_attn.k_proj", "model.layers.0.attention.wqkv",
                                         ((32, 48), (96, 112)))  # 2 kv heads × (2 q + k + v) × 16 rows
    assert plan.output_name("model.tok_embeddings.weight") == "model.embed_tokens.weight"
    ids = model.random_ids()
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() <= 1e-4


def test_gpt2_rows_longer_than_its_positions_are_refused_before_the_job(tiny_model, tmp_path, capsys):
    """GPT-2 takes at most n_positions tokens per row: convert refuses longer calibration rows in one line."""
    from exl2core.cli import main

    model = tiny_model("gpt2", **GPT)
    assert main(["convert", "-i", str(model.path), "-o", str(tmp_path / "job"), "-mr", "2", "-ml", "64",
                 "-r", "2", "-l", "512", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: GPT2LMHeadModel takes rows of at most 256 tokens (its learned positions), not 512: pass -l 256 "
        "or less")


def test_index_normalizes_its_head(tiny_model, tmp_path):
    """Index (remote code only) is Llama whose head rows are scaled to unit norm (norm_head): a tiny Llama
    rewritten as an Index checkpoint gives the logits of that Llama with its head normalized."""
    import copy

    from conftest import llama_as_index

    model = tiny_model("llama")
    source, plan = _rewritten(model, tmp_path, llama_as_index)
    assert plan.head.linears[0].normalized and not plan.modules[1].linears[0].normalized
    reference = copy.deepcopy(model.hf)
    with torch.no_grad():
        reference.lm_head.weight.copy_(F.normalize(reference.lm_head.weight, dim=1))
        ids = model.random_ids()
        expected = reference(input_ids=ids).logits.float()
    assert (forward_logits(source, plan, ids) - expected).abs().max().item() <= 1e-4
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() > 1e-2


def test_yi_is_llama_with_ln1_ln2(tiny_model, tmp_path):
    """The original Yi (remote code only) is Llama with its norms named ln1 / ln2: a tiny Llama rewritten as a
    Yi checkpoint gives transformers' Llama logits (each norm has its own weights, so a swap would show)."""
    from conftest import llama_as_yi

    model = tiny_model("llama")
    source, plan = _rewritten(model, tmp_path, llama_as_yi)
    assert plan.architecture == "YiForCausalLM"
    assert (plan.modules[1].tensors["input_norm"], plan.modules[2].tensors["input_norm"]) == (
        "model.layers.0.ln1.weight", "model.layers.0.ln2.weight")
    ids = model.random_ids()
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() <= 1e-4


def test_gpt2_default_rows_follow_its_positions_and_a_resumed_job_keeps_its_own(tiny_model, tmp_path, capsys):
    """Without -l / -ml a job takes rows as long as the model takes (GPT-2: its learned positions) and says so in
    one line; a resumed job without them keeps the lengths it started with (here shorter than that default)."""
    import json

    from exl2core.cli import main

    model = tiny_model("gpt2", **GPT)
    for name, lengths in (("default", []), ("explicit", ["-l", "128", "-ml", "128"])):
        job = tmp_path / name
        command = ["convert", "-i", str(model.path), "-o", str(job), "-mr", "1", "-r", "1", "-om",
                   str(tmp_path / f"{name}.json"), "--device", "cpu"]
        capsys.readouterr()
        assert main([*command, *lengths]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
        assert notes == ([] if lengths else [
            "note: GPT2LMHeadModel takes rows of at most 256 tokens (its learned positions): -l and -ml default "
            "to 256"])
        assert main(command) == 0  # resumed without -l / -ml: the finished job, unchanged
        assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith(("note:", "error:"))]
        settings = json.loads((job / "job.json").read_text())["settings"]
        assert settings["length"] == settings["measurement_length"] == (128 if lengths else 256)
