"""Self-attention sub-block: pre-norm, q/k/v projections, optional q/k norms, RoPE, causal attention
(GQA/MQA, optional sliding window and logit soft-capping), output projection, optional post-norm,
residual add. Positions are 0 … T−1 of each row; calibration never needs a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exl2core.modules.linear import Capture, apply_linear, capture_inputs, product_dtype
from exl2core.modules.norm import norm_role
from exl2core.modules.rope import apply_rope, rope_tables
from exl2core.plan import AttentionModule, ParallelModule

#: Bytes of float32 attention scores the explicit path materialises at once (bounded by head chunking).
SCORE_BUDGET = 1 << 28


def causal_mask(t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[T, T]`` bool, True where query i may attend key j: j ≤ i and, with a window, i − j < window."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


def attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention with float32 scores and softmax, soft-capped as ``c·tanh(s/c)`` if asked.

    ``q``: ``[B, H, T, D]``; ``k``, ``v``: ``[B, H, T, D]`` (already repeated for GQA)."""
    t = q.shape[-2]
    mask = causal_mask(t, window, q.device)
    heads_per_chunk = max(1, SCORE_BUDGET // (4 * t * t * q.shape[0]))
    out = []
    for h0 in range(0, q.shape[1], heads_per_chunk):
        sl = slice(h0, h0 + heads_per_chunk)
        scores = (q[:, sl].float() @ k[:, sl].float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out.append(torch.softmax(scores, dim=-1).to(v.dtype) @ v[:, sl])
    return torch.cat(out, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
           window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention over ``[B, H, T, D]`` tensors (``k``/``v`` may have fewer heads: GQA/MQA).

    Without soft-capping this is torch's fused attention (float32 softmax inside, no T×T buffer on
    CUDA), on float32 inputs in the dtype ``linear_products_in`` sets; soft-capping needs the explicit
    scores."""
    product = product_dtype() if softcap is None and q.dtype == torch.float32 else None
    if product is not None:
        q, k, v = q.to(product), k.to(product), v.to(product)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if softcap is not None:
        return attend_explicit(q, k, v, scale=scale, window=window, softcap=softcap)
    t = q.shape[-2]
    mask = None if window is None or window >= t else causal_mask(t, window, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out if product is None else out.float()


def attention_branch(module: AttentionModule | ParallelModule, weights: dict[str, torch.Tensor], h: torch.Tensor,
                     capture: Capture | None = None) -> torch.Tensor:
    """``o_proj(attention(h))`` for an already-normed ``h`` ``[B, T, hidden]``: no norm, no residual."""
    a = module.attention
    b, t, _ = h.shape
    heads, kv_heads, head_dim = a.num_heads, a.num_kv_heads, a.head_dim
    capture_inputs(module, ("q_proj", "k_proj", "v_proj"), h, capture)
    q = apply_linear(weights, "q_proj", h).view(b, t, heads, head_dim)
    k = apply_linear(weights, "k_proj", h).view(b, t, kv_heads, head_dim)
    v = apply_linear(weights, "v_proj", h).view(b, t, kv_heads, head_dim)
    if "q_norm" in weights:
        q = norm_role(q, weights, "q_norm", module.norm)
        k = norm_role(k, weights, "k_norm", module.norm)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if a.rope is not None and a.rope.kind != "none":
        cos, sin = rope_tables(a.rope, head_dim, t, a.rope_style, a.max_position, q.device)
        q, k = apply_rope(q, cos, sin, a.rope_style), apply_rope(k, cos, sin, a.rope_style)
    scale = a.scale or head_dim ** -0.5
    out = attend(q, k, v, scale=scale, window=a.sliding_window, softcap=a.softcap)
    out = out.transpose(1, 2).reshape(b, t, heads * head_dim)
    capture_inputs(module, ("o_proj",), out, capture)
    return apply_linear(weights, "o_proj", out)


def attention_forward(module: AttentionModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                      capture: Capture | None = None) -> torch.Tensor:
    """``x + o_proj(attention(norm(x)))`` for ``x`` of shape ``[B, T, hidden]``."""
    h = norm_role(x, weights, "input_norm", module.norm, out_dtype=weights["q_proj"].dtype)
    return _residual(module, weights, x, attention_branch(module, weights, h, capture))


def attention_tail(module: AttentionModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
                   inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`attention_forward` from o_proj's input (``inputs[o_proj.input]``) on, bit for bit."""
    return _residual(module, weights, x, apply_linear(weights, "o_proj", inputs[module.linear("o_proj").input]))


def _residual(module: AttentionModule, weights: dict[str, torch.Tensor], x: torch.Tensor,
              out: torch.Tensor) -> torch.Tensor:
    if "post_norm" in weights:
        out = norm_role(out, weights, "post_norm", module.norm, out_dtype=x.dtype)
    return x + out.to(x.dtype)
