"""The BigCode family: Starcoder2 (``Starcoder2ForCausalLM``), StarCoder 1 / SantaCoder (``GPTBigCodeForCausalLM``)
and its ancestor GPT-2 (``GPT2LMHeadModel``).

Starcoder2 is the pre-norm decoder with LayerNorm (weight and bias), a bias on every projection, NeoX
RoPE and an ungated GELU(tanh) MLP whose projections the checkpoint calls ``mlp.c_fc`` and ``mlp.c_proj``;
the head is tied to the embedding unless config.json says otherwise. exllamav2 0.3.2 reads those names,
expects every bias, and reads the norm epsilon as ``layer_norm_epsilon`` (Starcoder2's config.json says
``norm_epsilon``), which the output config.json gains.

GPT-2 and GPTBigCode have no RoPE but learned positions (``wpe``, added to the token embedding: this
plugin's module kind :class:`PositionalEmbedding`), q/k/v fused in ``attn.c_attn`` (GPTBigCode with one
key/value head, multi-query), LayerNorms ``ln_1`` / ``ln_2`` / ``ln_f`` and the head tied to ``wte``; GPT-2
stores its weights ``[in, out]`` (Conv1D). The output uses the names exllamav2 0.3.2 maps those
checkpoints to (its ``gpt2_keymap`` / ``bigcode_keymap``): ``model.embed_tokens``, ``model.wpe``,
``model.layers.{i}.ln_1``, ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` (c_attn split by rows, as
exllamav2 reads them when c_attn is absent), ``self_attn.o_proj``, ``mlp.c_fc``, ``mlp.c_proj``,
``model.norm``, ``lm_head``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar

import torch

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.modules.forward import embedding_forward, register_kind
from exl2core.modules.linear import Capture
from exl2core.plan import EmbeddingModule, HeadModule, ModelPlan, Module

ARCHITECTURES = ("Starcoder2ForCausalLM", "starcoder2", "GPTBigCodeForCausalLM", "gpt_bigcode",
                 "GPT2LMHeadModel", "gpt2")
#: The activations Starcoder2 checkpoints name; exllamav2 runs GELU with the tanh approximation.
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def starcoder2_epsilon(config: ModelConfig) -> float:
    return float(config.get("norm_epsilon", "layer_norm_epsilon", default=1e-5))


def starcoder2_output_config(raw: dict) -> dict:
    """config.json with ``layer_norm_epsilon``, the key exllamav2 0.3.2 reads Starcoder2's epsilon from."""
    out = dict(raw)
    out.setdefault("layer_norm_epsilon", raw.get("norm_epsilon", 1e-5))
    return out


def starcoder2_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    act = config.get("hidden_act", default="gelu_pytorch_tanh")
    if act not in GELU_TANH:
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (exllamav2 runs "
                        "Starcoder2 with GELU, tanh approximation)")
    if not config.get("use_bias", default=True):
        raise Exl2Error(f"{config.architecture}: use_bias = false is not supported (exllamav2 0.3.2 expects "
                        "a bias on every projection of Starcoder2)")
    config = dataclasses.replace(config, norm_eps=starcoder2_epsilon(config))
    spec = DecoderSpec(norm="layer", norm_bias=True, activation="gelu_tanh", gated_mlp=False, qkv_bias=True,
                       o_bias=True, mlp_bias=True, linear_names={"up_proj": "c_fc", "down_proj": "c_proj"},
                       tied_head=bool(config.get("tie_word_embeddings", default=True)))
    return dense_decoder_plan(config, architecture, spec, output_config=starcoder2_output_config)


@dataclass(frozen=True, kw_only=True)
class PositionalEmbedding(EmbeddingModule):
    """Token embedding plus a learned position embedding (tensor role ``position``, one row per position)."""

    kind: ClassVar[str] = "bigcode.embedding"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = ("embed", "position")


def positional_embedding_forward(module: PositionalEmbedding, weights: dict[str, torch.Tensor], ids: torch.Tensor,
                                 capture: Capture | None = None) -> torch.Tensor:
    h = embedding_forward(module, weights, ids, capture)
    table = weights["position"]
    t = h.shape[-2]
    if t > table.shape[0]:
        raise Exl2Error(f"{module.key}: rows of {t} tokens exceed the model's {table.shape[0]} learned positions; "
                        "use shorter calibration rows (-l, -ml)")
    return h + table[:t].to(h.dtype)


register_kind(PositionalEmbedding, positional_embedding_forward)

#: exllamav2's names (left) of GPT-2 / GPTBigCode checkpoint names (right, after the checkpoint's prefix),
#: most specific first: the inverse of exllamav2 0.3.2's gpt2_keymap / bigcode_keymap.
GPT_NAMES = (("model.layers.", "h."), (".self_attn.o_proj", ".attn.c_proj"), (".self_attn.", ".attn."),
             ("model.norm", "ln_f"), ("model.embed_tokens", "wte"), ("model.wpe", "wpe"))


def gpt_source(name: str, prefix: str) -> str:
    """The checkpoint key of the tensor exllamav2 calls ``name`` (``prefix``: ``transformer.`` or empty)."""
    for ours, theirs in GPT_NAMES:
        if ours.startswith("model.") and name.startswith(ours):
            name = prefix + theirs + name[len(ours):]
        elif not ours.startswith("model."):
            name = name.replace(ours, theirs)
    return name


def _read_gpt_checkpoint(module: Module, prefix: str, transposed: bool) -> Module:
    linears = tuple(dataclasses.replace(lin, source=gpt_source(lin.source, prefix),
                                        transposed=transposed and not isinstance(module, HeadModule))
                    for lin in module.linears)
    tensors = {role: gpt_source(key, prefix) for role, key in module.tensors.items()}
    return dataclasses.replace(module, linears=linears, tensors=tensors)


def gpt_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str]) -> ModelPlan:
    """GPT-2 / GPTBigCode: planned under exllamav2's names, read from the checkpoint's."""
    act = config.get("activation_function", default="gelu_new")
    if act not in GELU_TANH:
        raise Exl2Error(f"{architecture}: activation_function '{act}' is not supported (exllamav2 runs it "
                        "with GELU, tanh approximation)")
    bigcode = architecture in ("GPTBigCodeForCausalLM", "gpt_bigcode")
    if bigcode and not config.get("multi_query", default=True):
        raise Exl2Error(f"{architecture}: multi_query = false is not supported (exllamav2 0.3.2 runs "
                        "GPTBigCode with one key/value head)")
    for unsupported in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(unsupported):
            raise Exl2Error(f"{architecture}: {unsupported} = true is not supported by exllamav2 0.3.2")
    if config.get("scale_attn_weights") is False:
        raise Exl2Error(f"{architecture}: scale_attn_weights = false is not supported by exllamav2 0.3.2")
    if bigcode:
        config = dataclasses.replace(config, num_kv_heads=1)
    config = dataclasses.replace(config, norm_eps=float(config.get("layer_norm_epsilon", default=1e-5)))
    spec = DecoderSpec(norm="layer", norm_bias=True, activation="gelu_tanh", gated_mlp=False, qkv_bias=True,
                       o_bias=True, mlp_bias=True, attn_norm="ln_1", mlp_norm="ln_2", fused_qkv="c_attn",
                       linear_names={"up_proj": "c_fc", "down_proj": "c_proj"}, tied_head=True,
                       layer_ropes=[None] * config.num_layers)
    plan = dense_decoder_plan(config, architecture, spec)
    embed = plan.modules[0]
    modules = (PositionalEmbedding(key=embed.key, mode=embed.mode,
                                   tensors={**embed.tensors, "position": "model.wpe.weight"}),) + plan.modules[1:]
    # transformers writes ``transformer.h.0…``; the original GPT-2 checkpoints have no prefix
    prefix = "" if tensor_names and not any(k.startswith("transformer.") for k in tensor_names) else "transformer."
    modules = tuple(_read_gpt_checkpoint(m, prefix, transposed=not bigcode) for m in modules)
    ours = [name for m in plan.modules for name in m.tensors.values()] + ["model.wpe.weight"]
    names = {gpt_source(name, prefix): name for name in ours}
    positions = config.get("n_positions", "max_position_embeddings")
    return dataclasses.replace(plan, modules=modules, rename=names.get,
                               max_length=int(positions) if positions else None)


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str, tensor_names: Collection[str]) -> ModelPlan:
    if architecture in ("Starcoder2ForCausalLM", "starcoder2"):
        return starcoder2_plan(config, architecture)
    return gpt_plan(config, architecture, tensor_names)
