"""DBRX (``DbrxForCausalLM``): a Mixtral-style MoE decoder under other names, with fused tensors.

Each layer is LayerNorm (no bias) → attention → LayerNorm (no bias) → MoE of GLU experts; q/k/v are fused
in ``norm_attn_norm.attn.Wqkv`` and every expert's gate, up and down projections in the layer's three bare
parameters ``ffn.experts.mlp.w1`` / ``v1`` / ``w2``, each ``[experts · ffn, hidden]`` (``w2`` holds each
down projection transposed). exllamav2 0.3.2 maps DBRX's names (its ``dbrx_keymap``) and reads
``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` and ``block_sparse_moe.experts.{e}.w1`` / ``v1`` / ``w2``
when the fused tensors are absent: the plan writes those, each read from its rows (or, for ``w2``, its
columns) of the fused tensor, and uses exllamav2's names for the rest. The shape lives in config.json's
``attn_config`` / ``ffn_config``, which :func:`exl2_config_defaults` lifts to the keys the core reads.

exllamav2 0.3.2 does not clip q/k/v: a checkpoint with ``clip_qkv`` (the released DBRX models set 8) is
converted with a warning, and calibrated as exllamav2 runs it, without the clip.
"""

from __future__ import annotations

import dataclasses
import warnings

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec
from exl2core.builders.moe import ExpertLayout, MoeSpec, moe_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import Linear, ModelPlan, Module, MoeModule

ARCHITECTURES = ("DbrxForCausalLM", "dbrx")
#: exllamav2's names → the checkpoint's (the inverse of its dbrx_keymap), applied in this order.
DBRX_NAMES = (("model.layers.", "transformer.blocks."), (".self_attn.o_proj", ".norm_attn_norm.attn.out_proj"),
              (".self_attn.", ".norm_attn_norm.attn."), (".input_layernorm", ".norm_attn_norm.norm_1"),
              (".post_attention_layernorm", ".norm_attn_norm.norm_2"),
              (".block_sparse_moe.gate", ".ffn.router.layer"), (".block_sparse_moe.experts.", ".ffn.experts.mlp."),
              ("model.norm", "transformer.norm_f"), ("model.embed_tokens", "transformer.wte"))
LAYOUT = ExpertLayout(block="block_sparse_moe", router="gate", gate="w1", up="v1", down="w2",
                      width_key="intermediate_size")


def dbrx_source(name: str) -> str:
    for ours, theirs in DBRX_NAMES:
        name = name.replace(ours, theirs, 1)
    return name


@hookimpl
def exl2_config_defaults(raw: dict) -> dict | None:
    """The core's keys for what DBRX keeps in ``attn_config`` / ``ffn_config`` (exllamav2 reads the same)."""
    if raw.get("model_type") != "dbrx":
        return None
    attn, ffn = raw.get("attn_config") or {}, raw.get("ffn_config") or {}
    found = {"num_key_value_heads": attn.get("kv_n_heads"), "rope_theta": attn.get("rope_theta"),
             "intermediate_size": ffn.get("ffn_hidden_size"), "num_local_experts": ffn.get("moe_num_experts"),
             "num_experts_per_tok": ffn.get("moe_top_k")}
    return {k: v for k, v in found.items() if v is not None}


def _expert_source(lin: Linear, width: int) -> Linear:
    """Expert ``e``'s linear read from the fused bare parameter: rows ``e · width …`` of ``w1`` / ``v1``,
    the same columns of ``w2`` transposed."""
    prefix, expert, name = lin.source.rsplit(".", 2)
    block = (int(expert) * width, (int(expert) + 1) * width)
    fused = dataclasses.replace(lin, source=dbrx_source(f"{prefix}.{name}"), weight_suffix="")
    if lin.role == "w2":
        return dataclasses.replace(fused, transposed=True, columns=block)
    return dataclasses.replace(fused, rows=block)


def _read_checkpoint(module: Module, width: int) -> Module:
    if isinstance(module, MoeModule):
        linears = tuple(_expert_source(lin, width) for lin in module.linears)
    else:
        linears = tuple(dataclasses.replace(lin, source=dbrx_source(lin.source)) for lin in module.linears)
    tensors = {role: dbrx_source(key) for role, key in module.tensors.items()}
    return dataclasses.replace(module, linears=linears, tensors=tensors)


def _renormalize(config: ModelConfig) -> bool:
    """Top-k weights divided by their p-norm (``moe_normalize_expert_weights``): exllamav2 divides by the sum."""
    p = (config.get("ffn_config") or {}).get("moe_normalize_expert_weights", 1.0)
    if p is None:
        warnings.warn("DbrxForCausalLM with moe_normalize_expert_weights = null: exllamav2 0.3.2 renormalises "
                      "the top-k routing weights anyway, so it will not run this model as transformers does")
        return False
    if float(p) != 1.0:
        raise Exl2Error(f"DbrxForCausalLM with moe_normalize_expert_weights = {p} is not supported: exllamav2 "
                        "0.3.2 renormalises the top-k routing weights to sum 1 (p = 1)")
    return True


def dbrx_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    act = ((config.get("ffn_config") or {}).get("ffn_act_fn") or {}).get("name", "silu")
    if act != "silu":
        raise Exl2Error(f"{architecture}: ffn_act_fn '{act}' is not supported (DBRX uses silu)")
    clip = (config.get("attn_config") or {}).get("clip_qkv")
    if clip is not None:
        warnings.warn(f"{architecture} with clip_qkv = {clip}: exllamav2 0.3.2 does not clip q/k/v, so where they "
                      f"exceed ±{clip} it will not run this model as transformers does (converted and calibrated "
                      "without the clip, as exllamav2 runs it)")
    spec = DecoderSpec(norm="layer", fused_qkv="Wqkv")
    plan = moe_decoder_plan(config, architecture, spec, MoeSpec(LAYOUT, renormalize=_renormalize(config)))
    names = {dbrx_source(key): key for m in plan.modules for key in m.tensors.values()}
    modules = tuple(_read_checkpoint(m, config.intermediate_size) for m in plan.modules)
    return dataclasses.replace(plan, modules=modules, rename=names.get)


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    return dbrx_plan(config, architecture)
