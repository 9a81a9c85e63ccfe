"""Shared fixtures: tiny random HuggingFace models written to disk like real checkpoints.

``make_tiny_model(path, model_type, ...)`` builds any transformers causal LM from a small config, gives
it weights large enough that mistakes show in the logits (norm weights ≠ 1, non-zero biases), saves it
with safetensors (optionally sharded, in the transformers-5 or the classic config style) and writes a
word-level tokenizer.json. The ``tiny_model`` fixture caches models per parameter set for the session.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Tiny models: thread start-up costs more than it saves, and a loaded machine makes it much worse.
torch.set_num_threads(1)

TINY_DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_hidden_layers=2, intermediate_size=128, vocab_size=300, max_position_embeddings=256)


@dataclass
class TinyModel:
    """A tiny model on disk (``path``) and the same model in memory (``hf``, float32, eager attention)."""

    path: Path
    hf: torch.nn.Module

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    def hf_logits(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """transformers' float32 logits of ``ids`` with the model run in ``dtype``."""
        model = self.hf if dtype == torch.float32 else _copy_to(self.hf, dtype)
        with torch.inference_mode():
            return model(input_ids=ids).logits.float()

    def random_ids(self, batch: int = 2, length: int = 48, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.vocab_size, (batch, length), generator=g)


def _copy_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(dtype)


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Unit-scale random weights: embeddings N(0,1), matrices N(0, 1/fan_in), norms 1 ± 0.3, biases ± 0.3.

    HF's default init (std 0.02, norms = 1) gives near-uniform logits that hide most bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.3 * noise if "norm" in name else 0.3 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json over ``<unk> <s> </s> w3 … w{vocab_size−1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def to_classic_style(config_path: Path) -> None:
    """Rewrite a transformers-5 config.json in the classic style: top-level ``rope_theta`` and
    ``rope_scaling`` (``type`` for linear as old checkpoints have it, ``rope_type`` otherwise)."""
    config = json.loads(config_path.read_text())
    params = dict(config.pop("rope_parameters", None) or {})
    config["rope_theta"] = params.pop("rope_theta", 10000.0)
    kind = params.pop("rope_type", "default")
    kind_key = "type" if kind == "linear" else "rope_type"
    config["rope_scaling"] = None if kind == "default" else {kind_key: kind, **params}
    config_path.write_text(json.dumps(config, indent=2))


def make_tiny_model(path: Path, model_type: str = "llama", *, style: str = "v5", seed: int = 0,
                    max_shard_size: str | None = None, **config_overrides) -> TinyModel:
    """Write a tiny random ``model_type`` checkpoint to ``path`` and return it with its HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY_DIMS, **config_overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize_weights(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if style == "classic":
        to_classic_style(path / "config.json")
    write_tokenizer(path, config.vocab_size)
    return TinyModel(path, model)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(model_type="llama", **kwargs)`` → a cached :class:`TinyModel` (see make_tiny_model)."""
    cache: dict[str, TinyModel] = {}

    def make(model_type: str = "llama", **kwargs) -> TinyModel:
        key = json.dumps([model_type, kwargs], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(model_type), model_type, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model) -> TinyModel:
    """The default tiny Llama (untied head, default RoPE, transformers-5 config style)."""
    return tiny_model("llama")


def write_bpe_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json trained on the shipped calibration texts, so calibration rows hold
    real, varied tokens (a word-level tokenizer maps most of that text to ``<unk>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    data_dir = Path(__file__).resolve().parents[1] / "exl2core" / "data" / "calibration"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = sorted(str(p) for p in data_dir.glob("*.txt"))
    tok.train(files, trainer)
    tok.save(str(path / "tokenizer.json"))


CONVERT_DIMS = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    intermediate_size=512, vocab_size=500, num_hidden_layers=2)


@pytest.fixture(scope="session")
def convert_model(tmp_path_factory) -> Path:
    """A tiny Llama sized for conversion tests (dimensions a multiple of 32, real BPE tokenizer)."""
    model = make_tiny_model(tmp_path_factory.mktemp("convert_llama"), "llama", **CONVERT_DIMS)
    write_bpe_tokenizer(model.path, CONVERT_DIMS["vocab_size"])
    (model.path / "generation_config.json").write_text('{"bos_token_id": 1}')
    return model.path


#: A Granite whose multipliers MiniCPM can express (its attention scale is head_dim^-½): the same model as
#: a MiniCPM checkpoint (remote code only) after :func:`granite_as_minicpm`.
MINICPM_AS_GRANITE = dict(embedding_multiplier=4.0, attention_multiplier=0.25, residual_multiplier=0.22,
                          logits_scaling=8.0)


def granite_as_minicpm(path: Path) -> None:
    """Rewrite a saved Granite's config.json as MiniCPM's (``MiniCPMForCausalLM``, same tensor names):
    ``scale_emb``, ``scale_depth = residual_multiplier · √layers``, ``dim_model_base = hidden / logits_scaling``."""
    config = json.loads((path / "config.json").read_text())
    assert config["attention_multiplier"] == (config["hidden_size"] // config["num_attention_heads"]) ** -0.5
    config.update(architectures=["MiniCPMForCausalLM"], model_type="minicpm",
                  scale_emb=config.pop("embedding_multiplier"),
                  scale_depth=config.pop("residual_multiplier") * config["num_hidden_layers"] ** 0.5,
                  dim_model_base=int(config["hidden_size"] / config.pop("logits_scaling")))
    config.pop("attention_multiplier")
    (path / "config.json").write_text(json.dumps(config, indent=2))


#: A StableLM that is Orion (Llama with LayerNorms, weight and bias): full rotary, no q/k/v bias.
ORION_AS_STABLELM = dict(partial_rotary_factor=1.0, use_qkv_bias=False, layer_norm_eps=1e-5)


def stablelm_as_orion(path: Path) -> None:
    """Rewrite a saved StableLM (``ORION_AS_STABLELM``) config.json as Orion's (remote code, same tensor
    names), which reads the LayerNorm epsilon from ``rms_norm_eps``."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert rope["partial_rotary_factor"] == 1.0 and rope["rope_type"] == "default" and not config["use_qkv_bias"]
    config.update(architectures=["OrionForCausalLM"], model_type="orion", rms_norm_eps=config.pop("layer_norm_eps"),
                  rope_theta=rope["rope_theta"], rope_scaling=None)
    for key in ("use_qkv_bias", "qk_layernorm", "use_parallel_residual"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def llama_as_internlm2(path: Path) -> None:
    """Rewrite a saved Llama as an InternLM2 checkpoint (remote code only): its names, q/k/v packed into
    ``attention.wqkv`` per key/value head (the head's queries, its key, its value), ``bias`` for the biases."""
    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or config["hidden_size"] // heads
    tensors = load_file(path / "model.safetensors")
    out = {}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        q, k, v = (tensors.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        q = q.view(kv, heads // kv, d, -1)
        out[f"{p}attention.wqkv.weight"] = torch.cat([q, k.view(kv, 1, d, -1), v.view(kv, 1, d, -1)], 1).flatten(0, 2)
    names = {"self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
             "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
             "model.embed_tokens": "model.tok_embeddings", "lm_head": "output"}
    for key, t in tensors.items():
        for llama, internlm in names.items():
            key = key.replace(llama, internlm)
        out[key] = t
    save_file({k: t.contiguous() for k, t in out.items()}, path / "model.safetensors", metadata={"format": "pt"})
    rope = config.pop("rope_parameters", None) or {}
    config.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                  rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None)
    config.pop("attention_bias", None)
    config.pop("mlp_bias", None)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def llama_as_index(path: Path) -> None:
    """Rewrite a saved Llama's config.json as Index's (remote code only: Llama names, ``norm_head``)."""
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["IndexForCausalLM"], model_type="index", norm_head=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def llama_as_yi(path: Path) -> None:
    """Rewrite a saved Llama as an original Yi checkpoint (remote code only): the norms named ``ln1`` / ``ln2``."""
    from safetensors.torch import load_file, save_file

    names = {".input_layernorm.": ".ln1.", ".post_attention_layernorm.": ".ln2."}
    tensors = load_file(path / "model.safetensors")
    for llama, yi in names.items():
        tensors = {k.replace(llama, yi): t for k, t in tensors.items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.update(architectures=["YiForCausalLM"], model_type="Yi", rope_theta=rope.get("rope_theta", 10000.0),
                  rope_scaling=None)
    (path / "config.json").write_text(json.dumps(config, indent=2))


#: A Mixtral that is GemMoE but for Gemma's numerics (the rewrite and the test's reference add those):
#: GELU(tanh) experts, the head tied to the embedding.
GEMMOE_AS_MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                         hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)


def mixtral_as_gemmoe(path: Path) -> None:
    """Rewrite a saved Mixtral (``GEMMOE_AS_MIXTRAL``) as a GemMoE checkpoint (remote code only): Mixtral's
    names, RMSNorm weights stored as ``w − 1`` (Gemma's), no head tensor, the published config's keys.
    Run as GemMoE, it is that Mixtral with its embedding output scaled by √hidden."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors = {k: t - 1 if k.endswith("norm.weight") else t for k, t in tensors.items() if k != "lm_head.weight"}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.update(architectures=["GemmoeForCausalLM"], model_type="gemmoe", hidden_act="gelu",
                  rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None)
    (path / "config.json").write_text(json.dumps(config, indent=2))


#: A tiny DBRX (4 experts, top-2, ffn 64) for ``make_tiny_model(path, "dbrx", **DBRX_SHAPE)`` (``d_model``
#: itself: transformers sizes the experts from it, not from the ``hidden_size`` alias).
DBRX_SHAPE = dict(d_model=TINY_DIMS["hidden_size"], attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=None),
                  ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2))


def dbrx_as_published(path: Path, **attn_config) -> None:
    """Rewrite a saved DBRX's config.json as the released checkpoints have it: its shape only in ``d_model``,
    ``n_heads`` …, ``attn_config`` and ``ffn_config`` (transformers 5 also writes ``num_key_value_heads``,
    ``rope_parameters`` and the generic keys make_tiny_model passes), ``attn_config`` updated."""
    config = json.loads((path / "config.json").read_text())
    for key in ("num_key_value_heads", "rope_parameters", "head_dim", "intermediate_size", "hidden_size",
                "num_attention_heads", "num_hidden_layers", "max_position_embeddings"):
        config.pop(key, None)
    config["attn_config"].update(attn_config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
