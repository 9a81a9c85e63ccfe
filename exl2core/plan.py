"""The model plan: what a plugin tells the pipeline about a model.

A plan is frozen data. The pipeline walks ``ModelPlan.modules`` in order and never asks which
architecture it is converting: each module is an instance of one kind (a dataclass below, or a
plugin's subclass of :class:`Module`), whose typed attributes are the parameters of its forward.
Kinds are bound to their forwards in ``exl2core.modules.forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig, RopeSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Linear:
    """One linear layer of a module.

    ``name`` is unique within its module and is the key of its weight in the module's weight dict
    (``name`` → ``[out, in]`` weight, ``name + ".bias"`` → bias). ``role`` is the candidate-table
    column it is quantized with (``q_proj`` … ``down_proj``, ``w1``/``w3``/``w2`` for experts,
    ``lm_head``). ``key`` is the EXL2 output prefix (``key + ".q_weight"`` …); ``source`` the source
    tensor prefix (differs for tied heads). Linears of one module with the same ``input`` read the
    same activation and share one Hessian. ``rows`` ``(start, end)``: the linear is those output rows of
    a fused source tensor (Phi-3's ``qkv_proj``, ``gate_up_proj``; its bias too), written to the output as
    a linear of its own, as exllamav2 reads it; a tuple of such ranges takes them in order and
    concatenates them (InternLM2's ``wqkv``, packed per key/value head). ``transposed``: the source stores the weight ``[in, out]``
    (GPT-2's Conv1D); it is transposed when read, before ``rows`` are taken. ``normalized``: the model uses
    the weight with each row scaled to unit L2 norm (Index's ``norm_head``); it is read so, and so quantized
    and written, since exllamav2 normalises only an unquantized head. ``columns`` ``(start, end)``: the linear
    is those input features of the (transposed) source weight, taken after ``rows``, and has no bias (DBRX's
    experts' ``w2``, stored ``[experts · ffn, hidden]``: each expert's down projection is its ``ffn`` columns of
    the transposed tensor). ``weight_suffix`` follows ``source`` in the weight's key (``""`` for a bare
    parameter: DBRX's fused experts ``ffn.experts.mlp.w1``).
    """

    name: str
    role: str
    key: str
    source: str
    in_features: int
    out_features: int
    bias: bool
    input: str
    rows: tuple[int, int] | tuple[tuple[int, int], ...] | None = None
    transposed: bool = False
    normalized: bool = False
    columns: tuple[int, int] | None = None
    weight_suffix: str = ".weight"

    def __post_init__(self) -> None:
        if self.columns is not None and self.bias:
            raise Exl2Error(f"{self.key}: a linear read from columns of its source cannot have a bias")

    def row_ranges(self) -> tuple[tuple[int, int], ...]:
        """``rows`` as a tuple of ``(start, end)`` ranges (empty: the whole source tensor)."""
        if self.rows is None:
            return ()
        return self.rows if isinstance(self.rows[0], tuple) else (self.rows,)  # type: ignore[return-value]

    def __repr__(self) -> str:
        """The dataclass repr, naming ``rows``, ``transposed``, ``normalized``, ``columns`` and ``weight_suffix``
        only when set (so the plan digests of plans without them stay what they were)."""
        optional = {"rows": None, "transposed": False, "normalized": False, "columns": None, "weight_suffix": ".weight"}
        shown = (f for f in fields(self) if f.name not in optional or getattr(self, f.name) != optional[f.name])
        return f"Linear({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"


@dataclass(frozen=True)
class Slot:
    """One entry of the bit-allocation problem: a group of linears quantized with one table row.

    ``key`` is the strategy key (``model.layers.3.self_attn``), ``table`` is ``"attn"`` or ``"mlp"``
    and ``roles`` are the table columns present (an MLP without gate has no ``gate_proj``).
    ``output`` names the activation the slot's error is measured on when that is not the module's
    output: the forward reports it through its capture callback under this name (a parallel decoder's
    branch, exl2-format §5.4). Such a report is a measured output, never a Hessian source.
    """

    key: str
    table: str
    roles: tuple[str, ...]
    output: str | None = None


@dataclass(frozen=True)
class Norm:
    """How a module normalises: ``kind`` rms | layer, ``offset`` added to the weight (Gemma stores w − 1)."""

    kind: str = "rms"
    eps: float = 1e-6
    offset: float = 0.0


@dataclass(frozen=True)
class Attention:
    """The parameters of causal self-attention; ``rope`` None means no position embedding (Cohere 2's
    full layers) and ``scale`` None means ``head_dim^−½``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec | None = RopeSpec()
    rope_style: str = "neox"
    max_position: int | None = None
    sliding_window: int | None = None
    softcap: float | None = None
    scale: float | None = None


@dataclass(frozen=True, kw_only=True)
class Module:
    """One step of the streaming forward: an embedding, a decoder sub-block, a norm or the head.

    ``tensors`` maps a role of the kind's ``TENSOR_ROLES`` to the source key of an unquantized tensor
    the forward reads; those tensors are also written to the output (renamed by ``ModelPlan.rename``).
    ``slots`` are the measured groups; ``mode`` names the measurement record
    (``measurement[key + "." + mode]``); ``layer`` is the decoder layer (None outside the stack).
    ``shared_hessians`` overrides the Hessian sharing that ``Linear.input`` implies (see
    :meth:`hessian_groups`).
    """

    #: The kind's name, as ``exl2 inspect`` shows it.
    kind: ClassVar[str] = "module"
    #: Roles ``tensors`` may use; a misspelt role is refused when the plan is built.
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = ()

    key: str
    mode: str
    layer: int | None = None
    linears: tuple[Linear, ...] = ()
    tensors: Mapping[str, str] = field(default_factory=dict)
    slots: tuple[Slot, ...] = ()
    shared_hessians: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tensors) - set(self.TENSOR_ROLES))
        if unknown:
            raise Exl2Error(f"{self.key}: a {self.kind} module has no tensor role {', '.join(unknown)} "
                            f"(roles: {', '.join(self.TENSOR_ROLES) or 'none'})")

    @property
    def measurement_key(self) -> str:
        return f"{self.key}.{self.mode}"

    def linear(self, name: str) -> Linear:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(f"{self.key} has no linear {name!r}")

    def hessian_groups(self) -> list[list[str]]:
        """The linears by shared Hessian, the first of each group owning it (and fixing the act-order
        permutation the others reuse): ``shared_hessians`` when set, else grouped by ``Linear.input``."""
        if self.shared_hessians is not None:
            return [list(group) for group in self.shared_hessians]
        groups: dict[str, list[str]] = {}
        for lin in self.linears:
            groups.setdefault(lin.input, []).append(lin.name)
        return list(groups.values())

    def numel(self) -> int:
        """Quantized parameter count, output features padded to 32 as in the EXL2 layout."""
        return sum(lin.in_features * (-(-lin.out_features // 32) * 32) for lin in self.linears)


def _norm_roles(*roles: str) -> tuple[str, ...]:
    return tuple(r for role in roles for r in (role, role + ".bias"))


@dataclass(frozen=True, kw_only=True)
class EmbeddingModule(Module):
    """Token ids → hidden states, multiplied by ``scale`` (Gemma: √hidden)."""

    kind: ClassVar[str] = "embedding"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = ("embed",)

    scale: float = 1.0


@dataclass(frozen=True, kw_only=True)
class AttentionModule(Module):
    """``x + post_norm(o_proj(attention(norm(x))))``; linears ``q_proj k_proj v_proj o_proj``, q/k
    norms applied per head when the tensors are there."""

    kind: ClassVar[str] = "attention"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = _norm_roles("input_norm", "post_norm") + ("q_norm", "k_norm")

    norm: Norm
    attention: Attention


@dataclass(frozen=True, kw_only=True)
class MlpModule(Module):
    """``x + post_norm(down(act(gate(h)) · up(h)))``, ``h = norm(x)``; no ``gate_proj``: ``down(act(up(h)))``."""

    kind: ClassVar[str] = "mlp"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = _norm_roles("input_norm", "post_norm")

    norm: Norm
    activation: str = "silu"


@dataclass(frozen=True)
class Expert:
    """The names (``Linear.name``) of one expert's gate, up and down projections."""

    gate: str
    up: str
    down: str


#: ``f(module, weights, x) -> [tokens, experts]`` float routing weights, non-zero exactly for the selected
#: experts, for normed tokens ``x`` ``[tokens, hidden]``.
RoutingWeights = Callable[["MoeModule", Mapping[str, "torch.Tensor"], "torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True, kw_only=True)
class MoeModule(Module):
    """``x + Σ_e score_e · expert_e(norm(x))`` over the routed experts. The router is softmax → top-k →
    (``renormalize``) renormalise unless ``routing`` replaces it; ``all_experts_hessian`` calibrates
    every expert's down projection on every token."""

    kind: ClassVar[str] = "moe"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = ("input_norm", "router")

    norm: Norm
    experts: tuple[Expert, ...]
    top_k: int
    activation: str = "silu"
    renormalize: bool = True
    all_experts_hessian: bool = False
    routing: RoutingWeights | None = field(default=None, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return len(self.experts)


@dataclass(frozen=True, kw_only=True)
class ParallelModule(Module):
    """``x + attn(norm(x)) + mlp(norm(x))`` (Cohere): the attention's and the MLP's linears side by side."""

    kind: ClassVar[str] = "parallel"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = _norm_roles("input_norm") + ("q_norm", "k_norm")

    norm: Norm
    attention: Attention
    activation: str = "silu"


@dataclass(frozen=True, kw_only=True)
class NormModule(Module):
    """The final norm (tensor role ``weight``)."""

    kind: ClassVar[str] = "norm"
    TENSOR_ROLES: ClassVar[tuple[str, ...]] = _norm_roles("weight")

    norm: Norm


@dataclass(frozen=True, kw_only=True)
class HeadModule(Module):
    """Float32 logits ``lm_head(x) · logit_scale``, soft-capped, cut to ``vocab_size`` (0: uncut). The head
    is quantized with the head bits, outside the bit allocation."""

    kind: ClassVar[str] = "head"

    vocab_size: int = 0
    softcap: float | None = None
    logit_scale: float = 1.0


@dataclass(frozen=True)
class ModelPlan:
    """Everything the pipeline needs to know about one model.

    ``carry`` lists source-key prefixes copied to the output unconverted (vision towers,
    projectors). ``noise_rows`` is the number of Gaussian-noise calibration rows per pass
    (``(measurement, quantization)``), which some multimodal models want. ``rename`` gives the output
    (exllamav2) name of an unquantized source tensor, or None to keep it (quantized linears are named by
    ``Linear.key``); the default keeps every checkpoint name. ``output_config`` maps the source's config.json
    (a dict) to the one the compiled model gets, for a layout the loader recognises under another
    architecture (text-only Gemma 3); None copies it. ``max_length`` is the longest token row the model
    takes (learned position embeddings: GPT-2's 1024), checked against the calibration lengths before a
    job starts; None: no limit.
    """

    architecture: str
    config: ModelConfig
    modules: tuple[Module, ...]
    lm_prefix: str = ""
    carry: tuple[str, ...] = ()
    fp32_residual: bool = False
    noise_rows: tuple[int, int] = (0, 0)
    rename: Callable[[str], str | None] | None = field(default=None, repr=False, compare=False)
    output_config: Callable[[dict], dict] | None = field(default=None, repr=False, compare=False)
    max_length: int | None = None

    @property
    def head(self) -> HeadModule:
        head = self.modules[-1]
        if not isinstance(head, HeadModule):
            raise Exl2Error(f"{self.architecture}: the plan's last module is a {head.kind}, not the head")
        return head

    def output_name(self, source_key: str) -> str:
        """The name an unquantized source tensor is written under."""
        return (self.rename(source_key) if self.rename else None) or source_key

    def slots(self) -> list[Slot]:
        return [slot for module in self.modules for slot in module.slots]

    def blocks_numel(self) -> int:
        """Parameters counted against the bpw budget: every measured module (the head is apart)."""
        return sum(m.numel() for m in self.modules if m.slots)
