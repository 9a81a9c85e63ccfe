"""Token weights for the quantization pass's Hessians: how much an error at each calibration token reaches
the model's final distribution (the single-group case of GuidedQuant, Kim et al., ICML 2025).

GPTQ minimises ``Σ_t ‖ΔW x_t‖²``, every token alike. The KL it stands for weighs an output error at token
``t`` by the squared gradient there, ``Σ_t Σ_o g_{t,o}² (ΔW x_t)_o²`` (``pipeline.sensitivity``); averaged
over the output channels that is GPTQ's loss on the weighted Hessian ``Σ_t w_t x_t x_tᵀ`` with
``w_t = Σ_o g_{t,o}²``. Tokens whose errors the rest of the model ignores then steer the fit less.

The gradients come from one forward and backward pass of the unquantized model over a few of the
quantization rows (labels sampled from the model, as for the output sensitivity), at most
``TOKEN_WEIGHT_TOKENS`` tokens spread evenly over the real text rows. A linear's weights are normalised to
mean 1 and averaged over the linears that read the same input, which share one Hessian. The Hessian a
``strength`` β gets is the mixture ``(1 − β) H + β H_w``: with ``H_w`` estimated from the weighted rows,
row ``r`` of those has its input scaled by ``√(1 + β/(1 − β) · w_t · R/R_w)`` (``R`` rows in all, ``R_w``
weighted), every other row is left as it is. The weights are computed once per job by the first rank and
saved beside its checkpoints, so every rank and every resume reads the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.pipeline.job import load_tensors, save_tensors
from exl2core.pipeline.sensitivity import backpropagate, backward_tokens
from exl2core.plan import ModelPlan, Module

#: Quantization tokens whose gradients weigh the Hessians, at most.
TOKEN_WEIGHT_TOKENS = 8192
#: Name of the rows' index tensor in the saved file (the weights are named ``module key/input``).
ROWS_KEY = "rows"


@dataclass(frozen=True)
class TokenWeights:
    """Per linear input of every block (by :meth:`key`), the weights ``[len(rows), T]`` of the tokens of
    the quantization rows ``rows`` (indices into the job's ``total_rows`` rows), mean 1 over them."""

    rows: tuple[int, ...]
    total_rows: int
    weights: dict[str, torch.Tensor]

    @staticmethod
    def key(module: Module, site: str) -> str:
        return f"{module.key}/{site}"

    def factors(self, module: Module, strength: float) -> Callable[[str, int], torch.Tensor | None]:
        """``factor(site, row)``: the per-token factor ``[T]`` that row ``row``'s input ``site`` of
        ``module`` is scaled by before it enters the Hessian (module docstring), or None to leave it."""
        if not 0.0 <= strength < 1.0:
            raise Exl2Error(f"token weight strength must be in [0, 1), not {strength}")
        index = {row: i for i, row in enumerate(self.rows)}
        gain = strength / (1.0 - strength) * self.total_rows / len(self.rows)

        def factor(site: str, row: int) -> torch.Tensor | None:
            weights = self.weights.get(self.key(module, site))
            if not strength or weights is None or row not in index:
                return None
            return (weights[index[row]] * gain + 1.0).sqrt_()

        return factor

    def save(self, path: str | Path) -> None:
        save_tensors(path, {ROWS_KEY: torch.tensor([self.total_rows, *self.rows]), **self.weights})

    @classmethod
    def load(cls, path: str | Path) -> "TokenWeights":
        tensors = load_tensors(path)
        total, *rows = tensors.pop(ROWS_KEY).tolist()
        return cls(tuple(rows), total, tensors)


def token_weight_rows(ids: torch.Tensor, plan: ModelPlan, element_size: int) -> list[int]:
    """The quantization rows whose gradients are taken: real text rows only (noise rows start with a
    negative id), evenly spread, whole, at most ``TOKEN_WEIGHT_TOKENS`` tokens and as many as the
    backward pass's kept inputs fit in ``SENSITIVITY_MEMORY`` (at least one row)."""
    real = [i for i in range(ids.shape[0]) if ids[i, 0] >= 0]
    if not real:
        raise Exl2Error("the quantization rows hold no text row to weigh the tokens by")
    count = max(1, min(len(real), backward_tokens(plan, element_size, TOKEN_WEIGHT_TOKENS) // ids.shape[1]))
    return [real[i * len(real) // count] for i in range(count)]


def measure_token_weights(plan: ModelPlan, weights_of: Callable[[Module], dict[str, torch.Tensor]],
                          ids: torch.Tensor, rows: list[int], device: torch.device, seed: int,
                          on_module: Callable[[], None] | None = None) -> TokenWeights:
    """The token weights of the quantization rows ``ids[rows]`` (``backpropagate``'s other arguments)."""
    energy: dict[tuple[str, str], list[torch.Tensor | None]] = {}

    def observe(module: Module, row: int, name: str, grad: torch.Tensor) -> None:
        per_token = grad.reshape(-1, grad.shape[-1]).double().pow(2).sum(1)
        if per_token.numel() == ids.shape[1]:  # an expert's routed tokens are not the row's: left unweighted
            energy.setdefault((module.key, name), [None] * len(rows))[row] = per_token.cpu()

    backpropagate(plan, weights_of, ids[rows], device, seed, observe, on_module)
    weights: dict[str, torch.Tensor] = {}
    for module in plan.modules:
        sites: dict[str, list[torch.Tensor]] = {}
        for lin in module.linears:
            per_row = energy.get((module.key, lin.name))
            if per_row is None or any(r is None for r in per_row):
                continue
            stacked = torch.stack(per_row)
            mean = stacked.mean()
            if not torch.isfinite(mean) or mean <= 0:
                continue
            sites.setdefault(lin.input, []).append(stacked / mean)
        for site, parts in sites.items():
            weights[TokenWeights.key(module, site)] = torch.stack(parts).mean(0).float()
    return TokenWeights(tuple(rows), ids.shape[0], weights)
