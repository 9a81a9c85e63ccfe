"""Mixture-of-experts feed-forward (module kind ``moe``): pre-norm, router, top-k gated experts,
residual add.

The router runs in float32: softmax over the experts, top-k, and renormalisation of the k weights
when ``MoeModule.renormalize`` (Mixtral always, Qwen3-MoE per ``norm_topk_prob``); a plugin replaces
it with ``MoeModule.routing``. Expert ``e``'s linears are named by ``MoeModule.experts[e]``.

What the block reports to ``capture`` (exl2-format §5.2):

* :data:`MOE_INPUT`: the normed input of every token, once (all w1/w3 share one Hessian);
* :func:`down_input`: the w2 input of the tokens routed to ``e`` only (nothing when none were), or of
  every token when ``MoeModule.all_experts_hessian`` is set, so that rarely chosen experts are
  calibrated on all the data while the output keeps the true routing;
* :func:`tokens_input`: one ``1`` per token routed to ``e``, so the 1×1 "Hessian" accumulated under
  that name is the expert's routed-token count (read back with :func:`expert_token_counts`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from exl2core.errors import Exl2Error
from exl2core.modules.linear import Capture, apply_linear, capture_inputs
from exl2core.modules.mlp import FP16_MAX, activation
from exl2core.modules.norm import norm_role
from exl2core.plan import Expert, MoeModule

MOE_INPUT = "moe_in"

#: An expert is under-routed in a calibration row when it gets fewer than this fraction of its fair
#: share (``tokens · top_k / num_experts``) of the row's tokens.
UNDER_ROUTED_SHARE = 0.1


class UnderRoutedExpertWarning(UserWarning):
    """An expert saw too few calibration tokens for a well-conditioned down-projection Hessian."""


def down_input(expert: int) -> str:
    """Capture name (and ``Linear.input``) of expert ``expert``'s down projection."""
    return f"expert.{expert}.down"


def tokens_input(expert: int) -> str:
    """Capture name under which expert ``expert``'s routed tokens are counted."""
    return f"expert.{expert}.tokens"


def route(module: MoeModule, weights: Mapping[str, torch.Tensor],
          h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, selected)`` for normed tokens ``h`` ``[N, hidden]``: float32 ``[N, experts]`` routing
    weights and the bool mask of the experts each token is sent to.

    The module's own ``routing`` wins; its non-zero entries are the selection."""
    if module.routing is not None:
        scores = module.routing(module, weights, h).to(device=h.device, dtype=torch.float32)
        if scores.shape != (h.shape[0], module.num_experts):
            raise Exl2Error(f"{module.key}: its routing returned shape {tuple(scores.shape)}, "
                            f"expected ({h.shape[0]}, {module.num_experts})")
        return scores, scores != 0
    logits = F.linear(h.float(), weights["router"].float())
    probs = torch.softmax(logits, dim=-1)
    top, chosen = torch.topk(probs, module.top_k, dim=-1)
    if module.renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    scores = torch.zeros_like(probs).scatter_(1, chosen, top)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
    return scores, selected


def _expert_inner(weights: Mapping[str, torch.Tensor], expert: Expert, h: torch.Tensor,
                  act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``act(gate·h) · (up·h)``, the down projection's input, clamped to the fp16 range in fp16."""
    inner = act(apply_linear(weights, expert.gate, h)) * apply_linear(weights, expert.up, h)
    if inner.dtype == torch.float16:
        inner = inner.clamp(-FP16_MAX, FP16_MAX)
    return inner


def moe_forward(module: MoeModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                capture: Capture | None = None) -> torch.Tensor:
    """``x + Σ_e score_e · expert_e(norm(x))`` over the routed experts, for ``x`` ``[B, T, hidden]``.

    Expert outputs are weighted and summed in float32, then added to the residual in ``x``'s dtype."""
    hidden = x.shape[-1]
    first = module.experts[0].gate
    h = norm_role(x, weights, "input_norm", module.norm, out_dtype=weights[first].dtype).reshape(-1, hidden)
    scores, selected = route(module, weights, h)
    capture_inputs(module, (first,), h, capture)
    act = activation(module.activation)
    all_tokens = capture is not None and module.all_experts_hessian
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    counts = []
    for e, expert in enumerate(module.experts):
        tokens = selected[:, e].nonzero().squeeze(-1)
        counts.append(tokens.numel())
        if capture is not None:
            capture(tokens_input(e), torch.ones(tokens.numel(), 1, device=h.device))
            if all_tokens:
                capture(down_input(e), _expert_inner(weights, expert, h, act))
        if tokens.numel() == 0:
            continue
        inner = _expert_inner(weights, expert, h[tokens], act)
        if capture is not None and not all_tokens:
            capture(down_input(e), inner)
        y = apply_linear(weights, expert.down, inner)
        out.index_put_((tokens,), y.float() * scores[tokens, e, None], accumulate=True)
    if capture is not None:
        _warn_under_routed(module, counts, h.shape[0])
    return x + out.view(x.shape).to(x.dtype)


def under_routed(counts: list[int], tokens: int, top_k: int) -> list[int]:
    """The experts whose count is below :data:`UNDER_ROUTED_SHARE` of their fair share of ``tokens``."""
    fair = tokens * top_k / max(len(counts), 1)
    return [e for e, n in enumerate(counts) if n < UNDER_ROUTED_SHARE * fair]


def _warn_under_routed(module: MoeModule, counts: list[int], tokens: int) -> None:
    """One warning per (block, expert): the message is fixed, so Python's registry shows it once."""
    if module.all_experts_hessian:
        return
    for e in under_routed(counts, tokens, module.top_k):
        warnings.warn(f"{module.key}: expert {e} got fewer than {UNDER_ROUTED_SHARE:g} of its fair share of "
                      "a calibration row's tokens, so its down projection is calibrated on little data "
                      "(all-experts calibration, EXL2_MOE_ALL_EXPERTS=1 with the built-in MoE plugin, "
                      "calibrates every expert on every token)",
                      UnderRoutedExpertWarning, stacklevel=2)


def expert_token_counts(hessians: Mapping[str, object], module: MoeModule) -> list[int]:
    """Tokens routed to each expert of ``module`` over the rows whose Hessians are in ``hessians``
    (the ``{capture name: Hessian}`` dict the pipeline fills while running the block)."""
    counts = []
    for e in range(module.num_experts):
        hessian = hessians.get(tokens_input(e))
        matrix = getattr(hessian, "matrix", None)
        counts.append(0 if matrix is None else int(round(matrix.sum().item())))
    return counts


def moe_notes(module: MoeModule, hessians: Mapping[str, object]) -> list[str]:
    """Routed tokens per expert; experts that no token reached are quantized with an identity Hessian."""
    counts = expert_token_counts(hessians, module)
    lines = [f"tokens routed per expert: {counts}"]
    idle = [e for e, n in enumerate(counts) if n == 0]
    if idle and not module.all_experts_hessian:
        lines.append(f"experts {idle} saw no calibration token and fall back to an identity Hessian; "
                     "set EXL2_MOE_ALL_EXPERTS=1 to calibrate every expert on every token")
    return lines
