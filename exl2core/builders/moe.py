"""Plans of MoE decoders: the dense decoder with every feed-forward a block-sparse MoE (module kind
:class:`~exl2core.plan.MoeModule`), measured as ``model.layers.{i}.block_sparse_moe`` with the MLP table's
columns ``w1/w3/w2`` whatever the checkpoint calls them (exl2-format §5.1, §3.5). The experts keep their
checkpoint names in the output, in the compile order ``w1, w3, w2`` of each expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from exl2core.builders.decoder import DecoderSpec, decoder_norm, dense_decoder_plan, layer_key
from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.modules.moe import MOE_INPUT, down_input
from exl2core.plan import Expert, Linear, ModelPlan, MoeModule, RoutingWeights, Slot

MOE_MODE = "block_sparse_moe"
MOE_ROLES = ("w1", "w3", "w2")


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
class MoeSpec:
    """How an architecture's MoE blocks route: ``renormalize`` the top-k weights, ``all_experts_hessian``
    (calibrate every expert on every token), or a ``routing`` of its own."""

    layout: ExpertLayout
    renormalize: bool = True
    all_experts_hessian: bool = False
    routing: RoutingWeights | None = None


def expert_counts(config: ModelConfig) -> tuple[int, int]:
    """``(experts, top_k)`` from config.json, refused unless ``1 ≤ top_k ≤ experts``."""
    experts = config.get("num_local_experts", "num_experts")
    top_k = config.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 1:
        raise Exl2Error(f"config.json: an MoE model needs num_local_experts ≥ 1, not {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise Exl2Error(f"config.json: num_experts_per_tok must be between 1 and {experts}, not {top_k!r}")
    return experts, top_k


def moe_module(config: ModelConfig, spec: DecoderSpec, layer: int, *, moe: MoeSpec) -> MoeModule:
    """The MoE block of ``layer``: per expert ``w1, w3, w2`` (the compile order of exl2-format §8.1)."""
    key = layer_key(spec, layer)
    layout = moe.layout
    prefix = f"{key}.{layout.block}"
    count, top_k = expert_counts(config)
    hidden = config.hidden_size
    width = int(config.get(layout.width_key, default=config.intermediate_size))
    linears, experts = [], []
    for e in range(count):
        source = f"{prefix}.experts.{e}"
        names = []
        for role, name, k, n, input_name in (("w1", layout.gate, hidden, width, MOE_INPUT),
                                             ("w3", layout.up, hidden, width, MOE_INPUT),
                                             ("w2", layout.down, width, hidden, down_input(e))):
            names.append(f"experts.{e}.{role}")
            linears.append(Linear(name=names[-1], role=role, key=f"{source}.{name}", source=f"{source}.{name}",
                                  in_features=k, out_features=n, bias=False, input=input_name))
        experts.append(Expert(*names))
    tensors = {"input_norm": f"{key}.{spec.mlp_norm}.weight", "router": f"{prefix}.{layout.router}.weight"}
    return MoeModule(key=key, mode=MOE_MODE, layer=layer, linears=tuple(linears), tensors=tensors,
                     slots=(Slot(f"{key}.{MOE_MODE}", "mlp", MOE_ROLES),), norm=decoder_norm(config, spec),
                     activation=spec.activation, experts=tuple(experts), top_k=top_k,
                     renormalize=moe.renormalize, all_experts_hessian=moe.all_experts_hessian, routing=moe.routing)


def moe_decoder_plan(config: ModelConfig, architecture: str, spec: DecoderSpec, moe: MoeSpec,
                     **plan_fields) -> ModelPlan:
    """``embedding, (attention_i, moe_i) for each layer, final norm, head``."""
    expert_counts(config)
    return dense_decoder_plan(config, architecture, spec, mlp_block=partial(moe_module, moe=moe), **plan_fields)
