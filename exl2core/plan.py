"""The model plan: what a plugin tells the pipeline about a model.

A plan is plain data. The pipeline walks ``ModelPlan.modules`` in order and never asks which
architecture it is converting; everything architecture-specific is in the plan's fields or in a
plugin hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exl2core.model.config import ModelConfig

#: Module kinds that the core knows how to run (see ``exl2core.modules.forward``).
CORE_KINDS = ("embedding", "attention", "mlp", "moe", "parallel", "norm", "head")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a module.

    ``name`` is unique within its module and is the key of its weight in the module's weight dict
    (``name`` → ``[out, in]`` weight, ``name + ".bias"`` → bias). ``role`` is the candidate-table
    column it is quantized with (``q_proj`` … ``down_proj``, ``w1``/``w3``/``w2`` for experts,
    ``lm_head``). ``key`` is the EXL2 output prefix (``key + ".q_weight"`` …); ``source`` the source
    tensor prefix (differs for tied heads). Linears of one module with the same ``input`` read the
    same activation and share one Hessian.
    """

    name: str
    role: str
    key: str
    source: str
    in_features: int
    out_features: int
    bias: bool
    input: str


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


@dataclass
class Module:
    """One step of the streaming forward: an embedding, a decoder sub-block, a norm or the head.

    ``tensors`` maps a role (``input_norm``, ``router`` …) to the source key of an unquantized tensor
    the forward needs; those tensors are also written to the output (renamed through the
    ``exl2_output_name`` hook). ``fields`` are the forward's parameters (eps, activation, rope …).
    ``slots`` are the measured groups; ``mode`` names the measurement record
    (``measurement[key + "." + mode]``).
    """

    kind: str
    key: str
    mode: str
    linears: list[Linear] = field(default_factory=list)
    tensors: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    slots: list[Slot] = field(default_factory=list)

    @property
    def measurement_key(self) -> str:
        return f"{self.key}.{self.mode}"

    def linear(self, name: str) -> Linear:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(f"{self.key} has no linear {name!r}")

    def numel(self) -> int:
        """Quantized parameter count, output features padded to 32 as in the EXL2 layout."""
        return sum(lin.in_features * (-(-lin.out_features // 32) * 32) for lin in self.linears)


@dataclass
class ModelPlan:
    """Everything the pipeline needs to know about one model.

    ``carry`` lists source-key prefixes copied to the output unconverted (vision towers,
    projectors). ``noise_rows`` is the number of Gaussian-noise calibration rows per pass
    (``(measurement, quantization)``), which some multimodal models want.
    """

    architecture: str
    config: ModelConfig
    modules: list[Module]
    lm_prefix: str = ""
    carry: list[str] = field(default_factory=list)
    fp32_residual: bool = False
    noise_rows: tuple[int, int] = (0, 0)

    @property
    def head(self) -> Module:
        return self.modules[-1]

    def slots(self) -> list[Slot]:
        return [slot for module in self.modules for slot in module.slots]

    def blocks_numel(self) -> int:
        """Parameters counted against the bpw budget: every measured module (the head is apart)."""
        return sum(m.numel() for m in self.modules if m.slots)
