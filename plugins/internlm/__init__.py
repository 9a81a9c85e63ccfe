"""InternLM2 / InternLM2.5 (``InternLM2ForCausalLM``, published with remote code).

Llama under other names: ``model.tok_embeddings``, ``attention_norm`` / ``ffn_norm``, ``attention.wo``,
``feed_forward.w1`` / ``w3`` / ``w2`` (gate, up, down), the head ``output``, and q/k/v fused in
``attention.wqkv``, packed per key/value head (its query heads, then its key, then its value). exllamav2
0.3.2 maps those names (its ``internlm2_keymap``) and reads ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``
when ``wqkv`` is absent; the plan writes those three, each gathered from its rows of ``wqkv``, and uses
exllamav2's names for the rest (``model.embed_tokens``, ``self_attn.o_proj``, ``lm_head``).
"""

from __future__ import annotations

import dataclasses

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, dense_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan, Module

ARCHITECTURES = ("InternLM2ForCausalLM", "internlm2")
#: exllamav2's names → the checkpoint's (the inverse of its internlm2_keymap).
INTERNLM2_NAMES = (("model.embed_tokens", "model.tok_embeddings"), (".self_attn.o_proj", ".attention.wo"),
                   ("lm_head", "output"))


def internlm2_source(name: str) -> str:
    for ours, theirs in INTERNLM2_NAMES:
        if name == ours or name.startswith(ours + ".") or ours.startswith("."):
            name = name.replace(ours, theirs, 1)
    return name


def wqkv_rows(config: ModelConfig) -> dict[str, tuple[tuple[int, int], ...]]:
    """The rows of ``wqkv`` each of q, k and v gathers: per key/value head ``groups`` query heads, one key
    head and one value head of ``head_dim`` rows."""
    d, kv = config.head_dim, config.num_kv_heads
    groups = config.num_heads // kv
    block = (groups + 2) * d
    return {"q_proj": tuple((h * block, h * block + groups * d) for h in range(kv)),
            "k_proj": tuple((h * block + groups * d, h * block + (groups + 1) * d) for h in range(kv)),
            "v_proj": tuple((h * block + (groups + 1) * d, (h + 1) * block) for h in range(kv))}


def _read_checkpoint(module: Module, rows: dict) -> Module:
    linears = []
    for lin in module.linears:
        if lin.name in rows:
            lin = dataclasses.replace(lin, source=lin.source.rsplit(".", 2)[0] + ".attention.wqkv", rows=rows[lin.name])
        else:
            lin = dataclasses.replace(lin, source=internlm2_source(lin.source))
        linears.append(lin)
    tensors = {role: internlm2_source(key) for role, key in module.tensors.items()}
    return dataclasses.replace(module, linears=tuple(linears), tensors=tensors)


def internlm2_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{architecture}: hidden_act '{act}' is not supported (InternLM2 uses silu)")
    if config.num_heads % config.num_kv_heads:
        raise Exl2Error(f"{architecture}: {config.num_heads} heads do not split into {config.num_kv_heads} groups")
    bias = bool(config.get("bias", default=False))
    spec = DecoderSpec(qkv_bias=bias, o_bias=bias, attn_norm="attention_norm", mlp="feed_forward",
                       mlp_norm="ffn_norm", linear_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
    plan = dense_decoder_plan(config, architecture, spec)
    rows = wqkv_rows(config)
    names = {internlm2_source(key): key for m in plan.modules for key in m.tensors.values()}
    return dataclasses.replace(plan, modules=tuple(_read_checkpoint(m, rows) for m in plan.modules),
                               rename=names.get)


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    return internlm2_plan(config, architecture)
