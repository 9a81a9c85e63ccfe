"""RMSNorm and LayerNorm, always computed in float32 (as exllamav2's kernels do) whatever the input dtype.

``offset`` is added to the weight first: Gemma stores ``w − 1`` and normalises with ``w + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exl2core.errors import Exl2Error
from exl2core.plan import Norm

NORM_KINDS = ("rms", "layer")


def normalize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None, *,
              kind: str = "rms", eps: float = 1e-6, offset: float = 0.0,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalise the last dimension of ``x``; ``weight`` (and ``bias``) broadcast against it.

    The result has ``out_dtype`` (default: the dtype of ``x``)."""
    h = x.float()
    if kind == "rms":
        if bias is not None:
            raise Exl2Error("an RMS norm takes no bias")
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif kind == "layer":
        h = F.layer_norm(h, h.shape[-1:], eps=eps)
    else:
        raise Exl2Error(f"unknown norm kind '{kind}' (expected one of {', '.join(NORM_KINDS)})")
    if weight is not None:
        h = h * (weight.float() + offset)
    if bias is not None:
        h = h + bias.float()
    return h.to(out_dtype or x.dtype)


def norm_role(x: torch.Tensor, weights: dict[str, torch.Tensor], role: str, norm: Norm, *,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Apply the module's norm tensor ``role`` (plus ``role.bias``) as ``norm`` says."""
    return normalize(x, weights[role], weights.get(role + ".bias"), kind=norm.kind, eps=norm.eps,
                     offset=norm.offset, out_dtype=out_dtype)
