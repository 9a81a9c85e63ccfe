"""CUDA kernels for the quantizer and the EXL2 layout, each falling back to the PyTorch reference.

Every function takes and returns torch tensors. On CUDA tensors it runs the compiled extension's kernel
when the extension loads (``build.load_extension``) and that kernel passed its self-check
(``selfcheck``: random cases against the reference on first use); otherwise (CPU tensors,
``EXL2_NO_KERNELS=1``, no toolkit, failed build, failed check) it runs the reference in
``exl2core.quant``, which defines the numerics. Kernel and reference agree bit for bit, except
``grid_errors`` (float summation order) and ``exl2_matmul`` (fp32 accumulation order), which agree
within float / fp16 tolerance.

Hessian accumulation needs no kernel of its own: ``Hessian.add`` is already a single GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.kernels import selfcheck
from exl2core.kernels.layout import FUSED_MATMUL_MAX_ROWS, GroupTables, PreparedMatrix, group_tables, prepare_matrix
_KERNEL_BITS = frozenset((2, 3, 4, 5, 6, 8))


def _checked_for(tensor: torch.Tensor) -> selfcheck.CheckedExtension | None:
    """The checked extension serving ``tensor``'s device type; CPU tensors never trigger a load."""
    device = tensor.device.type
    checked = selfcheck.installed()
    if checked is None and device == "cuda":
        checked = selfcheck.checked_extension()
    return checked if checked is not None and checked.device == device else None


def extension_for(tensor: torch.Tensor) -> object | None:
    """The loaded extension if it serves ``tensor``'s device (some of its kernels may be disabled)."""
    checked = _checked_for(tensor)
    return None if checked is None else checked.module


def kernel_for(name: str, tensor: torch.Tensor) -> Callable | None:
    """Kernel ``name`` if it serves ``tensor``'s device and passed its self-check, else None."""
    checked = _checked_for(tensor)
    return None if checked is None else checked.kernel(name)


def quantize_group(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: int,
    maxq: int,
    diag: torch.Tensor | None = None,
    *,
    divisor: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ's quantize step for rows ``w [..., N]`` at fp16 column scales: ``(codes, q, err)``.

    ``codes = clamp(rint(w / scale) + zero, 0, maxq)`` (int16; a zero scale divides by 1), ``q`` the
    fp16-exact fake-quantized value (float32) and ``err = (w − q) / diag`` (per row; undivided when
    ``diag`` is None). ``out`` writes into given tensors, ``err`` may be None there. ``divisor`` (the
    zero-safe scale, if precomputed) only spares the reference an op; the kernel derives it in registers.
    Bit-exact with ``rounding.quantize_rows``.
    """
    kernel = kernel_for("quantize_rows", w)
    if kernel is None or w.dtype != torch.float32 or scale.dtype != torch.float32:
        from exl2core.quant.rounding import quantize_rows

        return quantize_rows(w, scale, zero, maxq, diag, divisor=divisor, out=out)
    if out is None:
        out = (torch.empty(w.shape, dtype=torch.int16, device=w.device), torch.empty_like(w),
               torch.empty_like(w))
    targets = [t if t is None or t.is_contiguous() else torch.empty_like(t) for t in out]
    flat_diag = None if diag is None else diag.to(torch.float32).reshape(-1).contiguous()
    kernel(w.contiguous(), scale.contiguous(), flat_diag, zero, maxq, *targets)
    for given, target in zip(out, targets):
        if given is not target:
            given.copy_(target)
    return out


def grid_errors(x: torch.Tensor, multipliers: torch.Tensor, column_scale: torch.Tensor, zero: int,
                maxq: int) -> torch.Tensor:
    """``Σ |q(x) − x|^3.5`` over ``x [R, N]`` for each trial scale ``multipliers[c] · column_scale``.

    On CUDA one fused pass (block reduction, then a sum over blocks) instead of materialising
    ``[c, R, N]`` temporaries; equal to ``rounding.grid_errors`` within float tolerance.
    """
    kernel = kernel_for("grid_errors", x)
    if kernel is None or x.dtype != torch.float32:
        from exl2core.quant.rounding import grid_errors as reference

        return reference(x, multipliers, column_scale, zero, maxq)
    return kernel(x.contiguous(), multipliers.to(torch.float32).contiguous(),
                  column_scale.to(torch.float32).contiguous(), zero, maxq)


def pack_codes(codes: torch.Tensor, group_bits: list[int], group_rows: list[int]) -> torch.Tensor:
    """Codes ``[K, N]`` (permuted rows) → ``q_weight`` int32 ``[Q, N]`` (exl2-format §2.5), as ``pack.pack_codes``."""
    kernel = kernel_for("pack_codes", codes)
    if kernel is None or not set(group_bits) <= _KERNEL_BITS:
        from exl2core.quant.pack import pack_codes as reference

        return reference(codes, group_bits, group_rows)
    tables = _checked_tables(codes, group_bits, group_rows)
    return kernel(codes.to(torch.int16).contiguous(), tables.bits, tables.row_start,
                  tables.qrow_start, tables.word_group)


def unpack_codes(q_weight: torch.Tensor,
                 q_groups: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """``q_weight`` → codes int16 ``[K, N]``, group widths and row counts, as ``pack.unpack_codes``."""
    from exl2core.quant.pack import group_layout, unpack_codes as reference

    kernel = kernel_for("unpack_codes", q_weight)
    if kernel is None or q_weight.dtype != torch.int32:
        return reference(q_weight, q_groups)
    group_bits, group_rows = group_layout(q_groups, q_weight.shape[0])
    tables = group_tables(group_bits, group_rows, q_weight.device)
    codes = kernel(q_weight.contiguous(), tables.bits, tables.row_start, tables.qrow_start,
                   tables.row_group)
    return codes, group_bits, group_rows


def dequantize(tensors: dict[str, torch.Tensor] | PreparedMatrix, prescale: float = 1.0) -> torch.Tensor:
    """fp16 weight ``[N, K]`` of an EXL2 layer (exl2-format §2.9), bit-exact with ``pack.dequantize``.

    A ``PreparedMatrix`` carries its own prescale (``prescale`` is then ignored).
    """
    raw = tensors.tensors if isinstance(tensors, PreparedMatrix) else tensors
    kernel = kernel_for("dequantize", raw["q_weight"]) if "q_weight" in raw else None
    if kernel is None:
        from exl2core.quant.pack import dequantize as reference

        return reference(raw, tensors.prescale if isinstance(tensors, PreparedMatrix) else prescale)
    prepared = tensors if isinstance(tensors, PreparedMatrix) else prepare_matrix(tensors, prescale)
    device = raw["q_weight"].device
    tables = prepared.tables
    return kernel(raw["q_weight"].contiguous(), raw["q_scale"].to(device).contiguous(),
                  prepared.scale_max, prepared.invperm, tables.bits, tables.row_start,
                  tables.qrow_start, tables.row_group)


def exl2_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor] | PreparedMatrix,
                prescale: float = 1.0) -> torch.Tensor:
    """``x · W`` for fp16 ``x [..., K]`` and an EXL2 layer (``W = dequantize(tensors).T``), fp16 out.

    The bias is not added. On CUDA, up to ``FUSED_MATMUL_MAX_ROWS`` rows run the fused kernel (weights
    rebuilt in registers, fp32 accumulation); longer inputs and other devices multiply by the
    dequantized weight. Pass a ``PreparedMatrix`` to skip validation and table building per call.
    """
    prepared = tensors if isinstance(tensors, PreparedMatrix) else prepare_matrix(tensors, prescale)
    if x.dtype != torch.float16:
        raise Exl2Error(f"exl2_matmul needs fp16 activations, got {x.dtype}")
    k = prepared.tables.rows
    if x.shape[-1] != k:
        raise Exl2Error(f"activations have {x.shape[-1]} features but the EXL2 weight has {k} rows")
    rows = x.reshape(-1, k)
    kernel = kernel_for("exl2_matmul", x)
    chunk_group = prepared.tables.chunk_group() if kernel is not None else None
    if kernel is None or chunk_group is None or rows.shape[0] > FUSED_MATMUL_MAX_ROWS:
        weight = dequantize(prepared)
        if x.device.type == "cuda":
            y = rows @ weight.T
        else:
            y = (rows.float() @ weight.float().T).to(torch.float16)
    else:
        raw, tables = prepared.tensors, prepared.tables
        y = kernel(rows.contiguous(), prepared.perm, raw["q_weight"].contiguous(),
                   raw["q_scale"].to(x.device).contiguous(), prepared.scale_max, tables.bits,
                   tables.qrow_start, tables.row_start, chunk_group)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _checked_tables(codes: torch.Tensor, group_bits: list[int], group_rows: list[int]) -> GroupTables:
    """Group tables for packing, rejecting what ``pack.pack_codes`` rejects (with the same messages)."""
    if sum(group_rows) != codes.shape[0]:
        raise Exl2Error(f"groups cover {sum(group_rows)} rows but the code matrix has {codes.shape[0]}")
    for bits, rows in zip(group_bits, group_rows):
        if rows <= 0 or rows * bits % 32:
            raise Exl2Error(f"a {bits}-bit group of {rows} rows does not fill whole 32-bit words")
    tables = group_tables(group_bits, group_rows, codes.device)
    limit = ((1 << tables.bits.to(torch.int64)) - 1)[tables.row_group.to(torch.int64)].unsqueeze(1)
    bad = (codes < 0) | (codes.to(torch.int64) > limit)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        bits = group_bits[int(tables.row_group[row])]
        raise Exl2Error(f"codes of a {bits}-bit group are outside 0..{(1 << bits) - 1}")
    return tables
