"""Mixture-of-experts architectures: Mixtral, Qwen3-MoE and GemMoE.

All are the Llama decoder with every feed-forward replaced by a block-sparse MoE (core module kind
``moe``, measured as ``model.layers.{i}.block_sparse_moe`` with the MLP table's columns ``w1/w3/w2``
whatever the checkpoint calls them, exl2-format §5.1, §3.5). The experts keep their checkpoint names in the
output, which is what exllamav2 0.3.2 reads (exl2-format §9.4): Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``
with the router ``block_sparse_moe.gate``; Qwen3-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
with the router ``mlp.gate``, plus q/k norms. Routing is softmax → top-k → renormalise; Qwen3-MoE
renormalises only when ``norm_topk_prob`` is set, as in transformers. GemMoE (``GemmoeForCausalLM``,
published with remote code only) is Mixtral's layout with Gemma's numerics, as exllamav2 0.3.2 runs it:
RMSNorm weights stored as ``w − 1``, embeddings scaled by √hidden, the head tied to the embedding and
GELU(tanh) experts (its ``gelu``: the MoE kernel's approximation).

Under-routed experts. By default (as exllamav2 does) an expert's down projection is calibrated on the
tokens routed to it only; an expert that few calibration tokens reach gets a poor Hessian (none at
all: the identity), and the forward warns (``UnderRoutedExpertWarning``) when an expert gets fewer than
a tenth of its fair share of a row. Set the environment variable ``EXL2_MOE_ALL_EXPERTS=1`` when
running ``exl2 convert`` to calibrate every expert on every token instead (the block's output still
uses the true routing); keep it set when resuming the same job. ``exl2core.modules.moe.
expert_token_counts(hessians, module)`` gives the routed-token count of each expert.

Not served: Qwen2-MoE (``Qwen2MoeForCausalLM``): exllamav2 0.3.2 does not recognise it and would load
it as a dense Llama, and its shared expert and shared-expert gate have no place in the ``w1/w3/w2``
measurement record. Qwen3-MoE checkpoints that mix dense layers into the MoE stack
(``mlp_only_layers``, ``decoder_sparse_step``) are refused for the same reason: exllamav2 builds every
layer of an MoE architecture as MoE.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import replace

from exl2core import hookimpl
from exl2core.builders.decoder import DecoderSpec
from exl2core.builders.moe import ExpertLayout, MoeSpec, expert_counts, moe_decoder_plan
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import ModelPlan


ALL_EXPERTS_ENV = "EXL2_MOE_ALL_EXPERTS"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def all_experts_hessian() -> bool:
    """Whether ``EXL2_MOE_ALL_EXPERTS`` asks for every expert to be calibrated on every token."""
    value = os.environ.get(ALL_EXPERTS_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Exl2Error(f"{ALL_EXPERTS_ENV}={os.environ[ALL_EXPERTS_ENV]!r}: expected 1 or 0")


def _check_silu(config: ModelConfig) -> None:
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported "
                        "(exllamav2 runs these experts with SiLU)")


MIXTRAL_LAYOUT = ExpertLayout(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2",
                              width_key="intermediate_size")


def _mixtral(config: ModelConfig) -> tuple[DecoderSpec, MoeSpec]:
    _check_silu(config)
    return DecoderSpec(), MoeSpec(MIXTRAL_LAYOUT, renormalize=True)


def _gemmoe(config: ModelConfig) -> tuple[DecoderSpec, MoeSpec]:
    """GELU(tanh) whatever ``hidden_act`` says (``gelu`` in the published config), as exllamav2 runs it."""
    spec = DecoderSpec(norm_offset=1.0, activation="gelu_tanh", embed_scale=config.hidden_size ** 0.5,
                       tied_head=True)
    return spec, MoeSpec(MIXTRAL_LAYOUT, renormalize=True)


def _qwen3_moe(config: ModelConfig) -> tuple[DecoderSpec, MoeSpec]:
    _check_silu(config)
    experts = config.get("num_local_experts", "num_experts", default=0)
    step = int(config.get("decoder_sparse_step", default=1))
    dense = sorted(set(config.get("mlp_only_layers", default=[]))
                   | {i for i in range(config.num_layers) if experts < 1 or (i + 1) % step != 0})
    if dense:
        raise Exl2Error(f"Qwen3MoeForCausalLM with dense layers {dense} (mlp_only_layers / "
                        "decoder_sparse_step) is not supported: exllamav2 0.3.2 builds every layer as MoE")
    renormalize = bool(config.get("norm_topk_prob", default=False))
    if not renormalize:
        warnings.warn("Qwen3MoeForCausalLM with norm_topk_prob = false: exllamav2 0.3.2 renormalises the "
                      "top-k routing weights anyway, so it will not run this model as transformers does")
    bias = bool(config.get("attention_bias", default=False))
    layout = ExpertLayout(block="mlp", router="gate", gate="gate_proj", up="up_proj", down="down_proj",
                          width_key="moe_intermediate_size")
    return DecoderSpec(qk_norm=True, qkv_bias=bias, o_bias=bias), MoeSpec(layout, renormalize)


#: architectures / model_type → its decoder and MoE blocks.
ARCHITECTURES: dict[str, Callable[[ModelConfig], tuple[DecoderSpec, MoeSpec]]] = {
    "MixtralForCausalLM": _mixtral,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "GemmoeForCausalLM": _gemmoe,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "gemmoe": _gemmoe,
}


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan | None:
    family = ARCHITECTURES.get(architecture)
    if family is None:
        return None
    expert_counts(config)
    spec, moe = family(config)
    return moe_decoder_plan(config, architecture, spec, replace(moe, all_experts_hessian=all_experts_hessian()))
