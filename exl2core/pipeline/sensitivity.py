"""Output sensitivity: how strongly an error in each linear's output moves the model's final distribution.

To second order, the KL divergence of a perturbed model's next-token distribution from the original's
is ``½ E[Δzᵀ F Δz]``, with ``F`` the Fisher information of the logits ``z``. Carried back to a linear's
output and approximated per output channel and per token (K-FAC with a diagonal output factor), the KL
per token that a weight error ``ΔW`` adds is

    KL ≈ ½ Σ_o g_o · (ΔW H ΔWᵀ)_oo / N

where ``H = Σ x xᵀ`` is the linear's input Hessian over the ``N`` measurement tokens and ``g_o`` the mean
over the tokens reaching the linear of the squared gradient of ``log p(y)`` with respect to output
channel ``o``, ``y`` sampled from the model itself (the Fisher's Monte-Carlo estimate). For an MoE expert
the routing probability cancels: ``H`` sums only routed tokens while ``N`` counts all of them.

``g`` costs one forward and one backward pass over a few calibration rows, streamed module by module
like the rest of the pipeline (each module's input is kept for its backward: rows × length × hidden
values per module). Errors of different layers then add up, so the allocator can minimise the predicted
KL of the whole model rather than a sum of per-block errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.modules.forward import module_forward
from exl2core.modules.linear import observe_linear_outputs
from exl2core.plan import ModelPlan, Module, Slot
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.job import load_tensors, save_tensors
from exl2core.pipeline.runner import all_finite, non_finite_origin

#: Calibration tokens the sensitivity pass reads at most.
SENSITIVITY_TOKENS = 8192
#: Host memory for the module inputs the backward pass replays; wide, deep models read fewer tokens.
SENSITIVITY_MEMORY = 4 << 30
#: Tokens read however little memory that leaves.
MIN_SENSITIVITY_TOKENS = 512
#: Tokens per chunk of the final norm and head, whose logits are vocabulary-wide.
HEAD_CHUNK = 256
#: Prefix of the slot scales' names in the saved file (gradients are named ``module/linear``).
SCALE_PREFIX = "scale:"
#: Prefix of the per-linear scales' names (``--sensitivity linear``).
LINEAR_SCALE_PREFIX = "linear-scale:"


@dataclass(frozen=True)
class Sensitivity:
    """Mean squared output gradient per output channel of every measured linear (float64), and, when the
    marginal-KL pass ran (``pipeline.marginal``), the measured-to-predicted KL scale of each slot
    (``scales``, by slot key) or of each linear (``linear_scales``, by :meth:`key`)."""

    grads: dict[str, torch.Tensor]
    scales: dict[str, float] | None = None
    linear_scales: dict[str, float] | None = None

    @staticmethod
    def key(module: Module, name: str) -> str:
        return f"{module.measurement_key}/{name}"

    def of(self, module: Module, name: str) -> torch.Tensor:
        return self.grads[self.key(module, name)]

    def predicted_kl(self, module: Module, name: str, errors: torch.Tensor, tokens: int) -> float:
        """``½ Σ_o g_o e_o / N``: the KL per token that output errors ``e = diag(ΔW H ΔWᵀ)`` of linear
        ``name``, summed over ``tokens`` tokens, add to second order (before any slot scale)."""
        return 0.5 * (self.of(module, name).to(errors) * errors).sum().item() / max(tokens, 1)

    def scale(self, slot: Slot) -> float:
        """The factor the slot's predicted KL is multiplied by: 1 without slot scales."""
        return 1.0 if self.scales is None else self.scales[slot.key]

    def linear_scale(self, module: Module, name: str) -> float:
        """The factor linear ``name``'s predicted KL is multiplied by: 1 without per-linear scales."""
        return 1.0 if self.linear_scales is None else self.linear_scales[self.key(module, name)]

    def save(self, path: str | Path) -> None:
        scales = {prefix + key: torch.tensor(value, dtype=torch.float64)
                  for prefix, values in ((SCALE_PREFIX, self.scales), (LINEAR_SCALE_PREFIX, self.linear_scales))
                  for key, value in (values or {}).items()}
        save_tensors(path, {**self.grads, **scales})

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        tensors = load_tensors(path)

        def scales(prefix: str) -> dict[str, float] | None:
            return {k[len(prefix):]: t.item() for k, t in tensors.items() if k.startswith(prefix)} or None

        grads = {k: t for k, t in tensors.items() if not k.startswith((SCALE_PREFIX, LINEAR_SCALE_PREFIX))}
        return cls(grads, scales(SCALE_PREFIX), scales(LINEAR_SCALE_PREFIX))


def backward_tokens(plan: ModelPlan, element_size: int, most: int) -> int:
    """How many tokens :func:`backpropagate` may read: at most ``most``, as many as the kept inputs of
    ``plan``'s modules (hidden size × modules × ``element_size`` bytes a token) fit in
    ``SENSITIVITY_MEMORY``, and never fewer than ``MIN_SENSITIVITY_TOKENS``."""
    per_token = plan.config.hidden_size * len(plan.modules) * element_size
    return max(MIN_SENSITIVITY_TOKENS, min(most, SENSITIVITY_MEMORY // per_token))


def sensitivity_rows(ids: torch.Tensor, plan: ModelPlan, element_size: int) -> torch.Tensor:
    """The calibration tokens the pass reads: real text rows only (noise rows start with a negative id),
    at most ``SENSITIVITY_TOKENS`` and as many as the kept inputs of ``plan``'s modules (hidden size ×
    modules × ``element_size`` bytes a token) fit in ``SENSITIVITY_MEMORY``; rows are cut short (a
    prefix of a causal row is a valid row) when one whole row does not fit."""
    real = ids[ids[:, 0] >= 0]
    tokens = backward_tokens(plan, element_size, SENSITIVITY_TOKENS)
    length = min(real.shape[1], tokens)
    return real[: max(1, tokens // length), :length]


def sensitivity_steps(plan: ModelPlan) -> int:
    """How many times :func:`measure_sensitivity` calls ``on_module``."""
    last = max(i for i, m in enumerate(plan.modules) if m.slots)
    return len(plan.modules) + last


#: Called with each measured linear's output gradient: ``(module, row, linear name, dL/dy)``.
GradientObserver = Callable[[Module, int, str, torch.Tensor], None]


def measure_sensitivity(plan: ModelPlan, weights_of: Callable[[Module], dict[str, torch.Tensor]],
                        ids: torch.Tensor, device: torch.device, seed: int,
                        on_module: Callable[[], None] | None = None) -> Sensitivity:
    """Each measured linear's mean squared output gradient per channel over the rows ``ids``
    (:func:`backpropagate`, whose arguments these are)."""
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def observe(module: Module, row: int, name: str, grad: torch.Tensor) -> None:
        key = Sensitivity.key(module, name)
        flat = grad.reshape(-1, grad.shape[-1]).double()
        if key not in sums:
            sums[key] = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
            tokens[key] = 0
        sums[key].add_(flat.pow(2).sum(0))
        tokens[key] += flat.shape[0]

    backpropagate(plan, weights_of, ids, device, seed, observe, on_module)
    keys = [Sensitivity.key(m, lin.name) for m in reversed(plan.modules) for lin in m.linears]
    return Sensitivity({key: (sums[key] / max(tokens[key], 1)).cpu() for key in keys if key in sums})


def backpropagate(plan: ModelPlan, weights_of: Callable[[Module], dict[str, torch.Tensor]], ids: torch.Tensor,
                  device: torch.device, seed: int, observe: GradientObserver,
                  on_module: Callable[[], None] | None = None) -> None:
    """Run ``ids`` (``[rows, T]``) forward through ``plan``, sample labels from the model's own output,
    and propagate the gradient of their log-likelihood back, block by block, handing each measured
    linear's output gradient to ``observe``. ``weights_of(module)`` loads a module's weights (each block's
    twice); ``on_module`` is called once per module and direction (:func:`sensitivity_steps` calls)."""
    modules = plan.modules
    blocks = [i for i, m in enumerate(modules) if m.slots]
    last = max(blocks)
    states = _forward(modules, weights_of, ids, device, last, on_module)
    grads = _head_gradients(modules[last + 1:], weights_of, states[last + 1], device, seed)
    if on_module:
        for _ in modules[last + 1:]:
            on_module()
    for i in range(last, 0, -1):
        module = modules[i]
        weights = weights_of(module)
        grads = _backward(module, weights, states[i], grads, device, observe)
        states[i] = []
        del weights
        if on_module:
            on_module()


def _forward(modules: list[Module], weights_of, ids: torch.Tensor, device, last: int, on_module
             ) -> list[list[torch.Tensor]]:
    """``states[i]`` = the rows' inputs of module ``i`` (host memory), for modules 1 … last + 1."""
    states: list[list[torch.Tensor]] = [[] for _ in range(last + 2)]
    rows = [row.unsqueeze(0).to(device) for row in ids]
    with torch.no_grad():  # not inference mode: the stored inputs are replayed under autograd
        for i in range(last + 1):
            module = modules[i]
            weights = weights_of(module)
            fwd = module_forward(module)
            inputs, rows = rows, [fwd(module, weights, row, None) for row in rows]
            for r, row in enumerate(rows):
                if not all_finite(row):
                    held = HiddenStates([x.squeeze(0) for x in inputs], device)
                    raise Exl2Error(non_finite_origin(fwd, module, weights, held, r))
            states[i + 1] = [row.cpu() for row in rows]
            del weights
            if on_module:
                on_module()
    return states


def _head_gradients(tail: list[Module], weights_of, inputs: list[torch.Tensor], device, seed: int
                    ) -> list[torch.Tensor]:
    """Gradient of ``Σ log p(y)`` (``y`` sampled from the model) w.r.t. the tail's input, per row.

    The tail (final norm, head) is token-wise, so it runs in chunks of ``HEAD_CHUNK`` tokens."""
    weights = [weights_of(m) for m in tail]
    forwards = [module_forward(m) for m in tail]
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for row in inputs:
        grad = torch.zeros(row.shape, dtype=torch.float32)
        for t0 in range(0, row.shape[1], HEAD_CHUNK):
            x = row[:, t0:t0 + HEAD_CHUNK].to(device).clone().requires_grad_(True)
            with torch.enable_grad():
                z = x
                for module, w, fwd in zip(tail, weights, forwards):
                    z = fwd(module, w, z, None)
                p = torch.softmax(z.detach().float(), dim=-1)
                if not torch.isfinite(p.sum()):
                    raise Exl2Error("non-finite logits in the sensitivity pass (the source model overflows in "
                                    "this precision, or holds non-finite weights); convert with --measure exact "
                                    "to find the module that produces them")
                labels = torch.multinomial(p.reshape(-1, p.shape[-1]).cpu(), 1, generator=gen).to(p.device)
                # d log p(y) / dz = onehot(y) − p
                dz = -p.reshape(-1, p.shape[-1])
                dz.scatter_add_(1, labels, torch.ones_like(labels, dtype=dz.dtype))
                z.backward(dz.reshape(z.shape).to(z.dtype))
            grad[:, t0:t0 + HEAD_CHUNK] = x.grad.float().cpu()
        grads.append(grad)
    return grads


def _backward(module: Module, weights: dict[str, torch.Tensor], inputs: list[torch.Tensor],
              grads: list[torch.Tensor], device, observe: GradientObserver) -> list[torch.Tensor]:
    """Backpropagate ``grads`` (w.r.t. the module's outputs) through ``module``, handing each measured
    linear's output gradient to ``observe``; returns the gradients w.r.t. the module's inputs."""
    fwd = module_forward(module)
    measured = {lin.name for lin in module.linears if any(lin.role in s.roles for s in module.slots)}
    seen = 0
    row = 0

    def on_output(name: str, y: torch.Tensor) -> None:
        nonlocal seen
        if name not in measured or not y.requires_grad:
            return
        seen += y.numel()
        y.register_hook(lambda g, r=row: observe(module, r, name, g))

    out = []
    for row, (x_row, g_row) in enumerate(zip(inputs, grads)):
        x = x_row.to(device).detach().requires_grad_(True)
        with torch.enable_grad(), observe_linear_outputs(on_output):
            y = fwd(module, weights, x, None)
            y.backward(g_row.to(device=device, dtype=y.dtype))
        out.append(x.grad.float().cpu())
    if measured and not seen:
        raise Exl2Error(f"{module.measurement_key}: its forward applies no linear through modules.linear.apply_linear, so "
                        "the output sensitivity cannot be measured; convert with --measure exact")
    return out
