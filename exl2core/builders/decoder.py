"""Plan building for decoder-only transformers: what every dense (and MoE) plugin has in common.

A plugin describes its architecture with a :class:`DecoderSpec` (norm kind, biases, activation,
tensor names …) and :func:`dense_decoder_plan` turns it and the config into the module list
``embedding, (attention, mlp) × layers, norm, head``. Plugins with other blocks pass their own
``mlp_block`` (``exl2core.builders.moe``), use ``exl2core.builders.parallel``, or assemble the plan
from the module builders below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from exl2core.model.config import ModelConfig, RopeSpec
from exl2core.plan import (Attention, AttentionModule, EmbeddingModule, HeadModule, Linear, MlpModule, Module,
                           ModelPlan, Norm, NormModule, Slot)

ATTN_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DecoderSpec:
    """How one architecture differs from Llama. Names are relative to ``{lm_prefix}model.layers.{i}``.

    ``sliding_windows`` and ``layer_ropes`` (per layer) override what :func:`layer_sliding_windows` and
    :func:`layer_rope` read from the config; a ``layer_ropes`` entry of None means no position embedding.
    ``fused_qkv`` / ``fused_gate_up`` name a checkpoint tensor under ``attn`` / ``mlp`` that holds q, k, v
    (gate, up) stacked by rows (Phi-3's ``qkv_proj``, ``gate_up_proj``): each linear reads its rows of it
    (``Linear.rows``) and keeps its own output name, which exllamav2 reads in place of the fused tensor.
    ``linear_names`` maps a linear's name (``up_proj`` …) to its checkpoint name under ``attn`` / ``mlp``
    when they differ (Starcoder2: ``c_fc``, ``c_proj``); the output keeps the checkpoint's name.
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
    layer_ropes: Sequence[RopeSpec | None] | None = None
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    linear_names: Mapping[str, str] | None = None


def config_biases(config: ModelConfig) -> dict[str, bool]:
    """The ``DecoderSpec`` bias flags config.json sets with transformers' ``attention_bias`` (q, k, v and o)
    and ``mlp_bias``."""
    attention = bool(config.get("attention_bias", default=False))
    return {"qkv_bias": attention, "o_bias": attention, "mlp_bias": bool(config.get("mlp_bias", default=False))}


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


def decoder_norm(config: ModelConfig, spec: DecoderSpec) -> Norm:
    """The norm every module of the decoder uses."""
    return Norm(kind=spec.norm, eps=config.norm_eps, offset=spec.norm_offset)


def norm_tensors(role: str, key: str, spec: DecoderSpec) -> dict[str, str]:
    """Tensor role → source key of the norm at ``key`` (``role.bias`` too when the spec's norms have one)."""
    tensors = {role: key + ".weight"}
    if spec.norm_bias:
        tensors[role + ".bias"] = key + ".bias"
    return tensors


def layer_key(spec: DecoderSpec, layer: int) -> str:
    return f"{spec.lm_prefix}model.layers.{layer}"


def _linear(prefix: str, name: str, in_features: int, out_features: int, bias: bool,
            input_name: str) -> Linear:
    return Linear(name=name, role=name, key=f"{prefix}.{name}", source=f"{prefix}.{name}",
                  in_features=in_features, out_features=out_features, bias=bias, input=input_name)


def checkpoint_names(linears: Sequence[Linear], prefix: str, spec: DecoderSpec) -> tuple[Linear, ...]:
    """``linears`` keyed and read under the checkpoint names ``spec.linear_names`` gives them."""
    names = spec.linear_names or {}
    return tuple(replace(lin, key=f"{prefix}.{names[lin.name]}", source=f"{prefix}.{names[lin.name]}")
                 if lin.name in names else lin for lin in linears)


def read_fused(linears: Sequence[Linear], source: str) -> tuple[Linear, ...]:
    """``linears`` read as consecutive row blocks, in order, of the fused source tensor ``source``."""
    out, start = [], 0
    for lin in linears:
        out.append(replace(lin, source=source, rows=(start, start + lin.out_features)))
        start += lin.out_features
    return tuple(out)


def embedding_module(config: ModelConfig, spec: DecoderSpec) -> EmbeddingModule:
    key = f"{spec.lm_prefix}model.embed_tokens"
    return EmbeddingModule(key=key, mode="embedding", tensors={"embed": key + ".weight"}, scale=spec.embed_scale)


def layer_attention(config: ModelConfig, spec: DecoderSpec, layer: int) -> Attention:
    """The attention parameters of ``layer``: heads, its RoPE and its sliding window."""
    windows = spec.sliding_windows if spec.sliding_windows is not None else layer_sliding_windows(config)
    return Attention(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope=spec.layer_ropes[layer] if spec.layer_ropes is not None else layer_rope(config, layer),
        rope_style=spec.rope_style,
        max_position=config.max_position_embeddings,
        sliding_window=windows[layer],
        softcap=spec.attn_softcap,
        scale=spec.attn_scale,
    )


def attention_linears(config: ModelConfig, spec: DecoderSpec, layer: int) -> tuple[Linear, ...]:
    prefix = f"{layer_key(spec, layer)}.{spec.attn}"
    hidden, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    qkv = checkpoint_names((
        _linear(prefix, "q_proj", hidden, q_out, spec.qkv_bias, "attn_in"),
        _linear(prefix, "k_proj", hidden, kv_out, spec.qkv_bias, "attn_in"),
        _linear(prefix, "v_proj", hidden, kv_out, spec.qkv_bias, "attn_in"),
    ), prefix, spec)
    if spec.fused_qkv:
        qkv = read_fused(qkv, f"{prefix}.{spec.fused_qkv}")
    return qkv + checkpoint_names((_linear(prefix, "o_proj", q_out, hidden, spec.o_bias, "attn_out"),), prefix, spec)


def attention_tensors(spec: DecoderSpec, layer: int) -> dict[str, str]:
    """The input norm, the optional post-norm and q/k norms of ``layer``'s attention."""
    key = layer_key(spec, layer)
    tensors = norm_tensors("input_norm", f"{key}.{spec.attn_norm}", spec)
    if spec.attn_post_norm:
        tensors.update(norm_tensors("post_norm", f"{key}.{spec.attn_post_norm}", spec))
    if spec.qk_norm:
        tensors["q_norm"] = f"{key}.{spec.attn}.q_norm.weight"
        tensors["k_norm"] = f"{key}.{spec.attn}.k_norm.weight"
    return tensors


def attention_module(config: ModelConfig, spec: DecoderSpec, layer: int) -> AttentionModule:
    key = layer_key(spec, layer)
    return AttentionModule(key=key, mode="self_attn", layer=layer, linears=attention_linears(config, spec, layer),
                           tensors=attention_tensors(spec, layer), slots=(Slot(f"{key}.self_attn", "attn", ATTN_ROLES),),
                           norm=decoder_norm(config, spec), attention=layer_attention(config, spec, layer))


def mlp_linears(config: ModelConfig, spec: DecoderSpec, layer: int) -> tuple[Linear, ...]:
    prefix = f"{layer_key(spec, layer)}.{spec.mlp}"
    hidden, inner = config.hidden_size, config.intermediate_size
    gate = (_linear(prefix, "gate_proj", hidden, inner, spec.mlp_bias, "mlp_in"),) if spec.gated_mlp else ()
    gate_up = checkpoint_names(gate + (_linear(prefix, "up_proj", hidden, inner, spec.mlp_bias, "mlp_in"),),
                               prefix, spec)
    if spec.fused_gate_up:
        gate_up = read_fused(gate_up, f"{prefix}.{spec.fused_gate_up}")
    down = _linear(prefix, "down_proj", inner, hidden, spec.mlp_bias, "mlp_down")
    return gate_up + checkpoint_names((down,), prefix, spec)


def mlp_slot(key: str, linears: Sequence[Linear]) -> Slot:
    return Slot(f"{key}.mlp", "mlp", tuple(lin.role for lin in linears))


def mlp_module(config: ModelConfig, spec: DecoderSpec, layer: int) -> MlpModule:
    key = layer_key(spec, layer)
    linears = mlp_linears(config, spec, layer)
    tensors = norm_tensors("input_norm", f"{key}.{spec.mlp_norm}", spec)
    if spec.mlp_post_norm:
        tensors.update(norm_tensors("post_norm", f"{key}.{spec.mlp_post_norm}", spec))
    return MlpModule(key=key, mode="mlp", layer=layer, linears=linears, tensors=tensors,
                     slots=(mlp_slot(key, linears),), norm=decoder_norm(config, spec), activation=spec.activation)


def final_norm_module(config: ModelConfig, spec: DecoderSpec) -> NormModule:
    key = f"{spec.lm_prefix}model.norm"
    return NormModule(key=key, mode="norm", tensors=norm_tensors("weight", key, spec), norm=decoder_norm(config, spec))


def head_module(config: ModelConfig, spec: DecoderSpec) -> HeadModule:
    key = f"{spec.lm_prefix}lm_head"
    tied = config.tie_word_embeddings if spec.tied_head is None else spec.tied_head
    source = f"{spec.lm_prefix}model.embed_tokens" if tied else key
    lin = Linear(name="lm_head", role="lm_head", key=key, source=source, in_features=config.hidden_size,
                 out_features=config.vocab_size, bias=False, input="head_in")
    return HeadModule(key=key, mode="linear", linears=(lin,), vocab_size=config.vocab_size,
                      softcap=spec.final_softcap, logit_scale=spec.logit_scale)


MlpBlock = Callable[[ModelConfig, DecoderSpec, int], Module]
LayerBlocks = Callable[[ModelConfig, DecoderSpec, int], Sequence[Module]]


def decoder_plan(config: ModelConfig, architecture: str, spec: DecoderSpec, layer_blocks: LayerBlocks,
                 **plan_fields) -> ModelPlan:
    """``embedding, layer_blocks(layer) for each layer, final norm, head``; ``plan_fields`` are the
    other :class:`ModelPlan` fields (``carry``, ``noise_rows``, ``rename``)."""
    modules = [embedding_module(config, spec)]
    for layer in range(config.num_layers):
        modules += layer_blocks(config, spec, layer)
    modules += [final_norm_module(config, spec), head_module(config, spec)]
    return ModelPlan(architecture=architecture, config=config, modules=tuple(modules), lm_prefix=spec.lm_prefix,
                     fp32_residual=spec.fp32_residual, **plan_fields)


def dense_decoder_plan(config: ModelConfig, architecture: str, spec: DecoderSpec,
                       mlp_block: MlpBlock = mlp_module, **plan_fields) -> ModelPlan:
    """``embedding, (attention_i, mlp_block_i) for each layer, final norm, head``."""
    return decoder_plan(config, architecture, spec,
                        lambda c, s, layer: (attention_module(c, s, layer), mlp_block(c, s, layer)), **plan_fields)
