"""The reference rounding math of the quantizer, which the CUDA kernels reproduce: a leaf module, so that
``quant.gptq`` (which dispatches to ``kernels``) and ``kernels`` (which falls back to this) need not import
each other."""

from __future__ import annotations

import torch

#: Elements per temporary of the vectorized scale search: cache-sized on CPU, large on GPUs where
#: kernel launches cost more than memory traffic.
SEARCH_CHUNK_ELEMS = {"cpu": 1 << 19, "cuda": 1 << 25}


def grid_errors(x: torch.Tensor, multipliers: torch.Tensor, column_scale: torch.Tensor, zero: int,
                maxq: int) -> torch.Tensor:
    """Σ|q(x) − x|^3.5 for each candidate multiplier, in chunks that bound the memory used.

    The reference of ``kernels.grid_errors`` (which search_scales calls: fused kernel on CUDA)."""
    errors = torch.empty(len(multipliers), dtype=torch.float32, device=x.device)
    step = max(1, SEARCH_CHUNK_ELEMS.get(x.device.type, 1 << 22) // x.numel())
    for i in range(0, len(multipliers), step):
        trial = (multipliers[i:i + step, None] * column_scale).unsqueeze(1)  # [c, 1, N]
        err = torch.div(x, trial).round_().clamp_(-zero, maxq - zero).mul_(trial).sub_(x).abs_()
        errors[i:i + step] = _sum_pow_3_5(err)
    return errors


def _sum_pow_3_5(err: torch.Tensor) -> torch.Tensor:
    """``Σ err^3.5`` over all but the first dim, as ``err² · err^1.5``: sqrt is far cheaper than pow."""
    flat = err.view(err.shape[0], -1)
    root = flat.sqrt().mul_(flat)
    return torch.linalg.vecdot(flat.square_(), root)


def quantize_rows(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: int,
    maxq: int,
    diag: torch.Tensor | None = None,
    *,
    divisor: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round rows ``w [..., N]`` to codes at fp16 column scales: ``(codes, q, err)`` (exl2-format §4.4).

    ``codes = clamp(rint(w / scale) + zero, 0, maxq)`` (a zero scale divides by 1, so an all-zero
    column rounds to code ``zero``), ``q`` the fake-quantized value and ``err = (w − q) / diag`` per row
    (undivided without ``diag``). ``(q − z)·scale`` is exact in float32 (small integer times an fp16
    number), so one rounding to fp16 reproduces the fp16 multiply of the reconstruction kernel.
    ``divisor`` is that zero-safe scale if the caller has it (it saves an op per row); ``out`` writes in
    place (its ``err`` may be None). The reference of ``kernels.quantize_group``.
    """
    if out is None:
        out = (torch.empty(w.shape, dtype=torch.int16, device=w.device),
               torch.empty(w.shape, dtype=torch.float32, device=w.device),
               torch.empty(w.shape, dtype=torch.float32, device=w.device))
    codes, fake, err = out
    q = torch.div(w, zero_safe(scale) if divisor is None else divisor).round_().add_(zero).clamp_(0, maxq)
    codes.copy_(q)
    fake.copy_(q.sub_(zero).mul_(scale).to(torch.float16))
    if err is not None:
        torch.sub(w, fake, out=err)
        if diag is not None:
            err.div_(diag if diag.dim() == 0 else diag.unsqueeze(-1))
    return out


def zero_safe(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: the divisor an all-zero column rounds with."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))
