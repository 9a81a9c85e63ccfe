"""Plan building for decoder-only transformers: what every dense (and MoE) plugin has in common.

A plugin describes its architecture with a :class:`DecoderSpec` (norm kind, biases, activation,
tensor names …) and :func:`dense_decoder_plan` turns it and the config into the module list
``embedding, (attention, mlp) × layers, norm, head``. Plugins with other blocks (MoE, parallel)
pass their own ``mlp_block`` or assemble the plan from the module builders below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from exl2core.model.config import ModelConfig, RopeSpec
from exl2core.plan import Linear, Module, ModelPlan, Slot

ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DecoderSpec:
    """How one architecture differs from Llama. Names are relative to ``{lm_prefix}model.layers.{i}``.

    ``sliding_windows`` and ``layer_ropes`` (per layer) override what :func:`layer_sliding_windows` and
    :func:`layer_rope` read from the config.
    """

    lm_prefix: str = ""
    norm: str = "rms"
    norm_offset: float = 0.0
    activation: str = "silu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_style: str = "neox"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    attn_post_norm: str | None = None
    mlp_norm: str = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    norm_bias: bool = False
    embed_scale: float = 1.0
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    logit_scale: float = 1.0
    tied_head: bool | None = None
    fp32_residual: bool = False
    sliding_windows: Sequence[int | None] | None = None
    layer_ropes: Sequence[RopeSpec] | None = None
    extra_attn_fields: dict = field(default_factory=dict)


def layer_types(config: ModelConfig) -> list[str] | None:
    """The config's per-layer ``layer_types`` (``full_attention``, ``sliding_attention`` …), if any."""
    types = config.get("layer_types")
    return list(types) if isinstance(types, list) and len(types) == config.num_layers else None


def layer_sliding_windows(config: ModelConfig) -> list[int | None]:
    """Sliding window of each layer as transformers applies it: ``sliding_window`` on the layers that
    ``layer_types`` marks sliding, else (older configs) on every layer from ``max_window_layers`` on when
    ``use_sliding_window`` is set, else on every layer; none when ``use_sliding_window`` is false."""
    window = config.get("sliding_window", "sliding_window_size")
    n = config.num_layers
    if not window or config.get("use_sliding_window") is False:
        return [None] * n
    types = layer_types(config)
    if types is not None:
        return [int(window) if t == "sliding_attention" else None for t in types]
    if config.get("use_sliding_window") and config.get("max_window_layers") is not None:
        first = int(config.get("max_window_layers"))
        return [int(window) if i >= first else None for i in range(n)]
    return [int(window)] * n


def layer_rope(config: ModelConfig, layer: int) -> RopeSpec:
    """The RoPE of a layer: its layer type's parameters when the config has them per type."""
    types = layer_types(config)
    if types is not None and types[layer] in config.rope_by_layer_type:
        return config.rope_by_layer_type[types[layer]]
    return config.rope


def _norm_fields(config: ModelConfig, spec: DecoderSpec) -> dict:
    return {"norm": spec.norm, "norm_eps": config.norm_eps, "norm_offset": spec.norm_offset}


def _norm_tensors(role: str, key: str, spec: DecoderSpec) -> dict[str, str]:
    tensors = {role: key + ".weight"}
    if spec.norm_bias:
        tensors[role + ".bias"] = key + ".bias"
    return tensors


def _linear(prefix: str, name: str, in_features: int, out_features: int, bias: bool,
            input_name: str) -> Linear:
    return Linear(name=name, role=name, key=f"{prefix}.{name}", source=f"{prefix}.{name}",
                  in_features=in_features, out_features=out_features, bias=bias, input=input_name)


def embedding_module(config: ModelConfig, spec: DecoderSpec) -> Module:
    key = f"{spec.lm_prefix}model.embed_tokens"
    return Module(kind="embedding", key=key, mode="embedding", tensors={"embed": key + ".weight"},
                  fields={"scale": spec.embed_scale})


def attention_module(config: ModelConfig, spec: DecoderSpec, layer: int) -> Module:
    key = f"{spec.lm_prefix}model.layers.{layer}"
    prefix = f"{key}.{spec.attn}"
    hidden, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    linears = [
        _linear(prefix, "q_proj", hidden, q_out, spec.qkv_bias, "attn_in"),
        _linear(prefix, "k_proj", hidden, kv_out, spec.qkv_bias, "attn_in"),
        _linear(prefix, "v_proj", hidden, kv_out, spec.qkv_bias, "attn_in"),
        _linear(prefix, "o_proj", q_out, hidden, spec.o_bias, "attn_out"),
    ]
    tensors = _norm_tensors("input_norm", f"{key}.{spec.attn_norm}", spec)
    if spec.attn_post_norm:
        tensors.update(_norm_tensors("post_norm", f"{key}.{spec.attn_post_norm}", spec))
    if spec.qk_norm:
        tensors["q_norm"] = f"{prefix}.q_norm.weight"
        tensors["k_norm"] = f"{prefix}.k_norm.weight"
    windows = spec.sliding_windows if spec.sliding_windows is not None else layer_sliding_windows(config)
    fields = {
        **_norm_fields(config, spec),
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": hd,
        "rope": spec.layer_ropes[layer] if spec.layer_ropes is not None else layer_rope(config, layer),
        "rope_style": spec.rope_style,
        "max_position": config.max_position_embeddings,
        "sliding_window": windows[layer],
        "softcap": spec.attn_softcap,
        "scale": spec.attn_scale,
        **spec.extra_attn_fields,
    }
    return Module(kind="attention", key=key, mode="self_attn", linears=linears, tensors=tensors,
                  fields=fields,
                  slots=[Slot(f"{key}.self_attn", "attn", ATTN_ROLES)])


def mlp_module(config: ModelConfig, spec: DecoderSpec, layer: int) -> Module:
    key = f"{spec.lm_prefix}model.layers.{layer}"
    prefix = f"{key}.{spec.mlp}"
    hidden, inner = config.hidden_size, config.intermediate_size
    linears = [_linear(prefix, "gate_proj", hidden, inner, spec.mlp_bias, "mlp_in")] if spec.gated_mlp else []
    linears += [
        _linear(prefix, "up_proj", hidden, inner, spec.mlp_bias, "mlp_in"),
        _linear(prefix, "down_proj", inner, hidden, spec.mlp_bias, "mlp_down"),
    ]
    tensors = _norm_tensors("input_norm", f"{key}.{spec.mlp_norm}", spec)
    if spec.mlp_post_norm:
        tensors.update(_norm_tensors("post_norm", f"{key}.{spec.mlp_post_norm}", spec))
    fields = {**_norm_fields(config, spec), "activation": spec.activation}
    return Module(kind="mlp", key=key, mode="mlp", linears=linears, tensors=tensors, fields=fields,
                  slots=[Slot(f"{key}.mlp", "mlp", tuple(lin.role for lin in linears))])


def final_norm_module(config: ModelConfig, spec: DecoderSpec) -> Module:
    key = f"{spec.lm_prefix}model.norm"
    return Module(kind="norm", key=key, mode="norm", tensors=_norm_tensors("weight", key, spec),
                  fields=_norm_fields(config, spec))


def head_module(config: ModelConfig, spec: DecoderSpec) -> Module:
    key = f"{spec.lm_prefix}lm_head"
    tied = config.tie_word_embeddings if spec.tied_head is None else spec.tied_head
    source = f"{spec.lm_prefix}model.embed_tokens" if tied else key
    lin = Linear(name="lm_head", role="lm_head", key=key, source=source, in_features=config.hidden_size,
                 out_features=config.vocab_size, bias=False, input="head_in")
    return Module(kind="head", key=key, mode="linear", linears=[lin],
                  fields={"vocab_size": config.vocab_size, "softcap": spec.final_softcap,
                          "logit_scale": spec.logit_scale})


MlpBlock = Callable[[ModelConfig, DecoderSpec, int], Module]


def dense_decoder_plan(config: ModelConfig, architecture: str, spec: DecoderSpec,
                       mlp_block: MlpBlock = mlp_module) -> ModelPlan:
    """``embedding, (attention_i, mlp_block_i) for each layer, final norm, head``."""
    modules = [embedding_module(config, spec)]
    for layer in range(config.num_layers):
        modules += [attention_module(config, spec, layer), mlp_block(config, spec, layer)]
    modules += [final_norm_module(config, spec), head_module(config, spec)]
    return ModelPlan(architecture=architecture, config=config, modules=modules, lm_prefix=spec.lm_prefix,
                     fp32_residual=spec.fp32_residual)
