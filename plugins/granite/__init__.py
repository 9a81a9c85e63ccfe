"""Granite (v3 dense, ``GraniteForCausalLM``) and MiniCPM (``MiniCPMForCausalLM``, remote code): Llama
with multipliers from config.json.

transformers multiplies the embeddings by ``embedding_multiplier``, scales attention scores by
``attention_multiplier`` (instead of ``head_dim^−½``), adds each sub-block's output to the residual stream
times ``residual_multiplier`` and divides the logits by ``logits_scaling``. exllamav2 0.3.2 reads the same
keys (exl2-format §9.5): the embedding scale, the attention scale, and the residual multiplier and
``1 / logits_scaling`` as prescales of o_proj, down_proj and the head. Three are fields of the core's
kinds; the residual multiplier is this plugin's own module kinds (:class:`GraniteAttention`,
:class:`GraniteMlp`), whose forwards scale o_proj / down_proj by it, as exllamav2's prescale does.

MiniCPM (1 and 2) is the same model under other keys, which exllamav2 reads too: the embeddings times
``scale_emb``, the residual multiplier ``scale_depth / √layers``, the logits divided by
``hidden_size / dim_model_base``, and the usual attention scale.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec, attention_module, config_biases, decoder_plan, mlp_module
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.modules.attention import attention_forward, attention_tail
from exl2core.modules.forward import register_kind
from exl2core.modules.linear import Capture
from exl2core.modules.mlp import mlp_forward, mlp_tail
from exl2core.plan import AttentionModule, MlpModule, ModelPlan

ARCHITECTURES = ("GraniteForCausalLM", "granite", "MiniCPMForCausalLM", "minicpm")


@dataclass(frozen=True, kw_only=True)
class GraniteAttention(AttentionModule):
    """``x + residual_scale · o_proj(attention(norm(x)))``."""

    kind: ClassVar[str] = "granite.attention"

    residual_scale: float = 1.0


@dataclass(frozen=True, kw_only=True)
class GraniteMlp(MlpModule):
    """``x + residual_scale · mlp(norm(x))``."""

    kind: ClassVar[str] = "granite.mlp"

    residual_scale: float = 1.0


def _scaled(weights: dict[str, torch.Tensor], name: str, scale: float) -> dict[str, torch.Tensor]:
    """``weights`` with linear ``name`` (and its bias) multiplied by ``scale``: its output scaled."""
    if scale == 1.0:
        return weights
    out = dict(weights)
    for key in (name, name + ".bias"):
        if key in out:
            out[key] = out[key] * torch.tensor(scale, dtype=out[key].dtype, device=out[key].device)
    return out


def granite_attention_forward(module: GraniteAttention, weights: dict[str, torch.Tensor], x: torch.Tensor,
                              capture: Capture | None = None) -> torch.Tensor:
    return attention_forward(module, _scaled(weights, "o_proj", module.residual_scale), x, capture)


def granite_mlp_forward(module: GraniteMlp, weights: dict[str, torch.Tensor], x: torch.Tensor,
                        capture: Capture | None = None) -> torch.Tensor:
    return mlp_forward(module, _scaled(weights, "down_proj", module.residual_scale), x, capture)


def granite_attention_tail(module: GraniteAttention, weights: dict[str, torch.Tensor], x: torch.Tensor,
                           inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return attention_tail(module, _scaled(weights, "o_proj", module.residual_scale), x, inputs)


def granite_mlp_tail(module: GraniteMlp, weights: dict[str, torch.Tensor], x: torch.Tensor,
                     inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return mlp_tail(module, _scaled(weights, "down_proj", module.residual_scale), x, inputs)


register_kind(GraniteAttention, granite_attention_forward, tail=granite_attention_tail)
register_kind(GraniteMlp, granite_mlp_forward, tail=granite_mlp_tail)


def _multiplier(config: ModelConfig, name: str) -> float:
    value = float(config.get(name, default=1.0) or 1.0)
    if value <= 0:
        raise Exl2Error(f"{config.architecture}: config.json's {name} must be positive, not {value}")
    return value


def granite_spec(config: ModelConfig) -> DecoderSpec:
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (Granite uses silu)")
    return DecoderSpec(embed_scale=_multiplier(config, "embedding_multiplier"),
                       attn_scale=_multiplier(config, "attention_multiplier"),
                       logit_scale=1.0 / _multiplier(config, "logits_scaling"), **config_biases(config))


def minicpm_spec(config: ModelConfig) -> DecoderSpec:
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported (MiniCPM uses silu)")
    base = _multiplier(config, "dim_model_base") if config.get("dim_model_base") else config.hidden_size
    return DecoderSpec(embed_scale=_multiplier(config, "scale_emb"), logit_scale=base / config.hidden_size,
                       **config_biases(config))


def granite_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    minicpm = architecture in ("MiniCPMForCausalLM", "minicpm")
    if minicpm:
        depth = config.get("scale_depth")
        residual = float(depth) / config.num_layers ** 0.5 if depth else 1.0
    else:
        residual = _multiplier(config, "residual_multiplier")

    def layer(c: ModelConfig, spec: DecoderSpec, i: int):
        attn, mlp = attention_module(c, spec, i), mlp_module(c, spec, i)
        return (GraniteAttention(**_fields(attn), residual_scale=residual),
                GraniteMlp(**_fields(mlp), residual_scale=residual))

    return decoder_plan(config, architecture, minicpm_spec(config) if minicpm else granite_spec(config), layer)


def _fields(module) -> dict:
    """A module's dataclass fields, to build the plugin's kind from the core builder's module."""
    return {f.name: getattr(module, f.name) for f in fields(module)}


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan:
    return granite_plan(config, architecture)
