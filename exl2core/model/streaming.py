"""Whole-model forward that holds one module's weights at a time.

Used to check a plan against the source model and to evaluate (dequantized) conversions on devices
far smaller than the model: only the activations of the batch and one module live on the device.
"""

from __future__ import annotations

from typing import Callable

import torch

from exl2core.model.source import SourceModel
from exl2core.modules.forward import module_forward
from exl2core.plan import EmbeddingModule, Module, ModelPlan

WeightsOverride = Callable[[Module], "dict[str, torch.Tensor] | None"]


def module_weights(source: SourceModel, module: Module, dtype: torch.dtype, device: torch.device | str,
                   weights_override: WeightsOverride | None = None) -> dict[str, torch.Tensor]:
    """The module's weights from the source, with whatever ``weights_override`` returns for it in
    place of the source's (those source tensors are not read)."""
    override = (weights_override(module) if weights_override else None) or {}
    weights = source.module_weights(module, dtype, device, skip=override.keys())
    for name, t in override.items():
        weights[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return weights


def forward_logits(source: SourceModel, plan: ModelPlan, input_ids: torch.Tensor, *,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   weights_override: WeightsOverride | None = None) -> torch.Tensor:
    """Float32 logits ``[B, T, vocab]`` of ``input_ids`` (``[B, T]`` or ``[T]``), computed in ``dtype``.

    ``weights_override(module)`` may return a partial weight dict (e.g. dequantized linears) that
    replaces the source's tensors of that module."""
    x = input_ids.to(device)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    with torch.inference_mode():
        for module in plan.modules:
            weights = module_weights(source, module, dtype, device, weights_override)
            x = module_forward(module)(module, weights, x)
            if isinstance(module, EmbeddingModule) and plan.fp32_residual:
                x = x.float()
            del weights
    return x.float()
