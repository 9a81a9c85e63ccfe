"""Mixture-of-experts architectures: Mixtral and Qwen3-MoE.

Both are the Llama decoder with every feed-forward replaced by a block-sparse MoE (core module kind
``moe``, measured as ``model.layers.{i}.block_sparse_moe`` with the MLP table's columns ``w1/w3/w2``
whatever the checkpoint calls them, exl2-format §5.1, §3.5). The experts keep their checkpoint names in the
output, which is what exllamav2 0.3.2 reads (exl2-format §9.4): Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``
with the router ``block_sparse_moe.gate``; Qwen3-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
with the router ``mlp.gate``, plus q/k norms. Routing is softmax → top-k → renormalise; Qwen3-MoE
renormalises only when ``norm_topk_prob`` is set, as in transformers.

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
from dataclasses import dataclass
from functools import partial
from typing import Callable

from exl2core import hookimpl
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.modules.decoder import DecoderSpec, dense_decoder_plan
from exl2core.modules.moe import MOE_INPUT, down_input, expert_token_counts
from exl2core.plan import Linear, Module, ModelPlan, Slot


ALL_EXPERTS_ENV = "EXL2_MOE_ALL_EXPERTS"
MOE_MODE = "block_sparse_moe"
MOE_ROLES = ("w1", "w3", "w2")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class ExpertLayout:
    """Where an architecture keeps its MoE tensors, relative to ``model.layers.{i}``: the block, the
    router inside it, the checkpoint names of each expert's (gate, up, down) projections, and the
    config key of the experts' width."""

    block: str
    router: str
    gate: str
    up: str
    down: str
    width_key: str


@dataclass(frozen=True)
class MoeFamily:
    decoder: DecoderSpec
    layout: ExpertLayout
    renormalize: bool


def all_experts_hessian() -> bool:
    """Whether ``EXL2_MOE_ALL_EXPERTS`` asks for every expert to be calibrated on every token."""
    value = os.environ.get(ALL_EXPERTS_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Exl2Error(f"{ALL_EXPERTS_ENV}={os.environ[ALL_EXPERTS_ENV]!r}: expected 1 or 0")


def _expert_counts(config: ModelConfig) -> tuple[int, int]:
    experts = config.get("num_local_experts", "num_experts")
    top_k = config.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 1:
        raise Exl2Error(f"config.json: an MoE model needs num_local_experts ≥ 1, not {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise Exl2Error(f"config.json: num_experts_per_tok must be between 1 and {experts}, not {top_k!r}")
    return experts, top_k


def _check_silu(config: ModelConfig) -> None:
    act = config.get("hidden_act", default="silu")
    if act != "silu":
        raise Exl2Error(f"{config.architecture}: hidden_act '{act}' is not supported "
                        "(exllamav2 runs these experts with SiLU)")


def moe_module(config: ModelConfig, spec: DecoderSpec, layer: int, *, layout: ExpertLayout,
               renormalize: bool, all_experts: bool) -> Module:
    """The MoE block of ``layer``: per expert ``w1, w3, w2`` (exllamav2's compile order, exl2-format §8.1)."""
    key = f"{spec.lm_prefix}model.layers.{layer}"
    prefix = f"{key}.{layout.block}"
    experts, top_k = _expert_counts(config)
    hidden = config.hidden_size
    width = int(config.get(layout.width_key, default=config.intermediate_size))
    linears = []
    for e in range(experts):
        source = f"{prefix}.experts.{e}"
        for role, name, k, n, input_name in (("w1", layout.gate, hidden, width, MOE_INPUT),
                                             ("w3", layout.up, hidden, width, MOE_INPUT),
                                             ("w2", layout.down, width, hidden, down_input(e))):
            linears.append(Linear(name=f"experts.{e}.{role}", role=role, key=f"{source}.{name}",
                                  source=f"{source}.{name}", in_features=k, out_features=n, bias=False,
                                  input=input_name))
    fields = {"norm": spec.norm, "norm_eps": config.norm_eps, "norm_offset": spec.norm_offset,
              "activation": spec.activation, "num_experts": experts, "top_k": top_k,
              "renormalize": renormalize, "all_experts_hessian": all_experts}
    tensors = {"input_norm": f"{key}.{spec.mlp_norm}.weight", "router": f"{prefix}.{layout.router}.weight"}
    return Module(kind="moe", key=key, mode=MOE_MODE, linears=linears, tensors=tensors, fields=fields,
                  slots=[Slot(f"{key}.{MOE_MODE}", "mlp", MOE_ROLES)])


def _mixtral(config: ModelConfig) -> MoeFamily:
    layout = ExpertLayout(block="block_sparse_moe", router="gate", gate="w1", up="w3", down="w2",
                          width_key="intermediate_size")
    return MoeFamily(DecoderSpec(), layout, renormalize=True)


def _qwen3_moe(config: ModelConfig) -> MoeFamily:
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
    return MoeFamily(DecoderSpec(qk_norm=True, qkv_bias=bias, o_bias=bias), layout, renormalize)


#: architectures / model_type → its MoE family.
ARCHITECTURES: dict[str, Callable[[ModelConfig], MoeFamily]] = {
    "MixtralForCausalLM": _mixtral,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
}


@hookimpl
def exl2_architectures() -> list[str]:
    return list(ARCHITECTURES)


@hookimpl
def exl2_model_plan(config: ModelConfig, architecture: str) -> ModelPlan | None:
    family = ARCHITECTURES.get(architecture)
    if family is None:
        return None
    _check_silu(config)
    _expert_counts(config)
    moe = family(config)
    block = partial(moe_module, layout=moe.layout, renormalize=moe.renormalize,
                    all_experts=all_experts_hessian())
    return dense_decoder_plan(config, architecture, moe.decoder, mlp_block=block)


@hookimpl
def exl2_calibration_report(module: Module, hessians: dict) -> list[str] | None:
    """Routed tokens per expert; experts that no token reached are quantized with an identity Hessian."""
    if module.kind != "moe":
        return None
    counts = expert_token_counts(hessians, module)
    lines = [f"tokens routed per expert: {counts}"]
    idle = [e for e, n in enumerate(counts) if n == 0]
    if idle and not module.fields.get("all_experts_hessian"):
        lines.append(f"experts {idle} saw no calibration token and fall back to an identity Hessian; "
                     f"set {ALL_EXPERTS_ENV}=1 to calibrate every expert on every token")
    return lines
