"""Running EXL2 directories through the streaming forward.

An EXL2 directory keeps the source's config.json and tokenizer; its quantized linears are stored as
``P.q_weight … P.q_invperm`` instead of ``P.weight`` and the head is always ``lm_head.*``, even when
the source ties it to the embedding. :class:`Exl2Weights` dequantizes those linears module by module
as a ``weights_override`` of :func:`exl2core.model.streaming.forward_logits`, so an FP16 directory and
its conversion are evaluated by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.model.streaming import WeightsOverride, forward_logits
from exl2core.plan import Linear, Module, ModelPlan
from exl2core.plugins import Plugins, installed
from exl2core.quant.pack import QUANT_SUFFIXES, dequantize


def is_exl2(source: SourceModel) -> bool:
    """True when the directory holds packed EXL2 linears."""
    return any(key.endswith(".q_weight") for key in source.keys())


class Exl2Weights:
    """``weights_override`` reading the packed linears of an EXL2 directory.

    Packed tensors are moved to ``device`` before dequantization (fast on a GPU). With ``cache`` the
    dequantized fp16 weights are kept after first use: worth it when the same small model runs many
    times (generation), not when the model is larger than the device.
    """

    def __init__(self, source: SourceModel, plan: ModelPlan, device: torch.device | str = "cpu",
                 cache: bool = False):
        self.source = source
        self.plan = plan
        self.device = device
        self._cache: dict[str, dict[str, torch.Tensor]] | None = {} if cache else None

    def __call__(self, module: Module) -> dict[str, torch.Tensor] | None:
        if self._cache is not None and module.measurement_key in self._cache:
            return self._cache[module.measurement_key]
        weights: dict[str, torch.Tensor] = {}
        for lin in module.linears:
            if self.source.has(lin.key + ".q_weight"):
                weights.update(self._linear(lin))
        weights.update(self._renamed_tensors(module))
        if self._cache is not None:
            self._cache[module.measurement_key] = weights
        return weights or None

    def _linear(self, lin: Linear) -> dict[str, torch.Tensor]:
        """The dequantized weight ``[out_features, in_features]`` (and bias), padding cut off."""
        packed = {s: self.source.tensor(f"{lin.key}.{s}", device=self.device) for s in QUANT_SUFFIXES}
        out = {lin.name: dequantize(packed)[:lin.out_features]}
        if self.source.has(lin.key + ".bias"):
            bias = self.source.tensor(lin.key + ".bias", device=self.device)
            out[lin.name + ".bias"] = bias[:lin.out_features]
        return out

    def _renamed_tensors(self, module: Module) -> dict[str, torch.Tensor]:
        """Unquantized tensors the converter wrote under another name (``ModelPlan.rename``)."""
        found = {}
        for role, key in module.tensors.items():
            if self.source.has(key):
                continue
            name = self.plan.output_name(key)
            if name and name != key and self.source.has(name):
                found[role] = self.source.tensor(name, device=self.device)
        return found


@dataclass
class InferenceModel:
    """A model directory opened for inference: FP16 HF or EXL2, through the same streaming forward."""

    source: SourceModel
    plan: ModelPlan
    weights_override: WeightsOverride | None

    @property
    def path(self) -> Path:
        return self.source.path

    def logits(self, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Float32 logits ``[B, T, vocab]`` of ``input_ids`` (``[B, T]`` or ``[T]``)."""
        return forward_logits(self.source, self.plan, input_ids, dtype=dtype, device=device,
                              weights_override=self.weights_override)


def inference_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device (default cuda if available, else cpu) and compute dtype (default float16 on CUDA, where
    it is fast, float32 elsewhere) named by ``--device`` and ``--dtype``."""
    try:
        where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise Exl2Error(f"unknown device {device!r} ({e})") from None
    name = dtype or ("float16" if where.type == "cuda" else "float32")
    if name not in ("float32", "float16", "bfloat16"):
        raise Exl2Error(f"unsupported dtype {name!r} (float32, float16 or bfloat16)")
    return where, getattr(torch, name)


def open_model(model_dir: str | Path, device: torch.device | str = "cpu", arch: str | None = None,
               cache: bool = False, plugins: Plugins | None = None) -> InferenceModel:
    """Open an FP16 HF or an EXL2 directory; ``cache`` keeps dequantized EXL2 weights (see Exl2Weights)."""
    plugins = plugins or installed()
    source = SourceModel(model_dir, plugins)
    plan = plugins.resolve_plan(source.config, arch, source.keys())
    override = Exl2Weights(source, plan, device, cache) if is_exl2(source) else None
    return InferenceModel(source, plan, override)
