"""On-disk EXL2 tensor layout (exl2-format §2): bit packing of codes and scales, and exact dequantization.

Pure tensor functions shared by the quantizer (``QuantizedLinear.pack``) and by anything that reads EXL2
files back. All bit manipulation is done in int64 so that unsigned 32-bit words never overflow; words are
converted to two's-complement int32 only at the end, as safetensors stores them.
"""

from __future__ import annotations

import math

import torch

from exl2core.errors import Exl2Error

_WORD = 32
_MASK32 = (1 << 32) - 1

#: Tensor suffixes of one EXL2 linear (exl2-format §2.1), bias excluded.
QUANT_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest repeating unit of a ``bits``-wide LSB-first bit stream (exl2-format §2.5)."""
    codes = _WORD // math.gcd(bits, _WORD)
    return codes, codes * bits // _WORD


def _runs(group_bits: list[int], group_rows: list[int]) -> list[tuple[int, int, int]]:
    """Merge consecutive groups of equal width into ``(bits, first_row, nrows)`` runs.

    Each group's stream starts on a word boundary and fills whole words, so a run of equal-width groups
    packs exactly like one long stream; this lets one vectorized pass handle many groups.
    """
    runs: list[tuple[int, int, int]] = []
    start = 0
    for bits, rows in zip(group_bits, group_rows):
        if rows <= 0 or rows * bits % _WORD:
            raise Exl2Error(f"a {bits}-bit group of {rows} rows does not fill whole 32-bit words")
        if runs and runs[-1][0] == bits:
            runs[-1] = (bits, runs[-1][1], runs[-1][2] + rows)
        else:
            runs.append((bits, start, rows))
        start += rows
    return runs


def pack_codes(codes: torch.Tensor, group_bits: list[int], group_rows: list[int]) -> torch.Tensor:
    """Pack codes ``[K, N]`` (permuted row order) into ``q_weight`` int32 ``[Q, N]`` (exl2-format §2.5)."""
    k, n = codes.shape
    if sum(group_rows) != k:
        raise Exl2Error(f"groups cover {sum(group_rows)} rows but the code matrix has {k}")
    parts = []
    for bits, start, rows in _runs(group_bits, group_rows):
        per_chunk, words_per_chunk = _chunk(bits)
        chunk = codes[start:start + rows].to(torch.int64).view(rows // per_chunk, per_chunk, n)
        if chunk.min() < 0 or chunk.max() >= 1 << bits:
            raise Exl2Error(f"codes of a {bits}-bit group are outside 0..{(1 << bits) - 1}")
        words = torch.zeros(rows // per_chunk, words_per_chunk, n, dtype=torch.int64, device=codes.device)
        for i in range(per_chunk):
            word, offset = divmod(i * bits, _WORD)
            words[:, word] |= (chunk[:, i] << offset) & _MASK32
            if offset + bits > _WORD:
                words[:, word + 1] |= chunk[:, i] >> (_WORD - offset)
        parts.append(words.view(-1, n))
    return _to_int32(torch.cat(parts))


def make_q_groups(group_bits: list[int], group_rows: list[int]) -> torch.Tensor:
    """``q_groups`` int16 ``[2G]``: per group its width and first packed row (exl2-format §2.6)."""
    entries = []
    qrow = 0
    for bits, rows in zip(group_bits, group_rows):
        entries += [bits, qrow]
        qrow += rows * bits // _WORD
    if qrow >= 1 << 15:
        raise Exl2Error(f"{qrow} packed rows exceed the int16 range of q_groups")
    return torch.tensor(entries, dtype=torch.int16)


def group_layout(q_groups: torch.Tensor, packed_rows: int) -> tuple[list[int], list[int]]:
    """Recover ``(group_bits, group_rows)`` from ``q_groups`` as the 0.3.2 loader does (exl2-format §2.6)."""
    entries = q_groups.to(torch.int64).tolist()
    bits, starts = entries[0::2], entries[1::2]
    ends = starts[1:] + [packed_rows]
    rows = []
    for b, start, end in zip(bits, starts, ends):
        if b not in (2, 3, 4, 5, 6, 8) or end <= start or (end - start) * _WORD % b:
            raise Exl2Error(f"invalid q_groups entry (bits {b}, packed rows {start}..{end})")
        rows.append((end - start) * _WORD // b)
    return bits, rows


def unpack_codes(q_weight: torch.Tensor, q_groups: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Inverse of ``pack_codes``: codes int16 ``[K, N]`` plus the group widths and row counts."""
    group_bits, group_rows = group_layout(q_groups, q_weight.shape[0])
    n = q_weight.shape[1]
    words_all = q_weight.to(torch.int64) & _MASK32
    parts = []
    qrow = 0
    for bits, _, rows in _runs(group_bits, group_rows):
        per_chunk, words_per_chunk = _chunk(bits)
        nwords = rows * bits // _WORD
        words = words_all[qrow:qrow + nwords].view(rows // per_chunk, words_per_chunk, n)
        qrow += nwords
        chunk = torch.empty(rows // per_chunk, per_chunk, n, dtype=torch.int64, device=q_weight.device)
        mask = (1 << bits) - 1
        for i in range(per_chunk):
            word, offset = divmod(i * bits, _WORD)
            code = words[:, word] >> offset
            if offset + bits > _WORD:
                code = code | (words[:, word + 1] << (_WORD - offset))
            chunk[:, i] = code & mask
        parts.append(chunk.view(-1, n))
    return torch.cat(parts).to(torch.int16), group_bits, group_rows


def pack_scales(qscale: torch.Tensor) -> torch.Tensor:
    """Pack scale codes ``[G, N]`` (values 1..16) into ``q_scale`` int32 ``[G, N/8]`` nibbles (exl2-format §2.7)."""
    g, n = qscale.shape
    if n % 8:
        raise Exl2Error(f"q_scale needs a column count divisible by 8, got {n}")
    nib = qscale.to(torch.int64) - 1
    if nib.min() < 0 or nib.max() > 15:
        raise Exl2Error("scale codes must lie in 1..16")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qscale.device)
    return _to_int32((nib.view(g, n // 8, 8) << shifts).sum(-1))


def unpack_scales(q_scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_scales``: scale codes int16 ``[G, N]`` in 1..16."""
    g, w = q_scale.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q_scale.device)
    nib = ((q_scale.to(torch.int64) & _MASK32).unsqueeze(-1) >> shifts) & 15
    return (nib + 1).view(g, w * 8).to(torch.int16)


def fake_quant_values(codes: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """fp16 value of ``codes`` at fp16 ``scale`` per column: ``fp16(fp16(q − z) · s)`` (exl2-format §2.9).

    Both factors are fp16 numbers, so their float32 product is exact and rounding it to fp16 is the
    single fp16 multiply the reconstruction kernel performs.
    """
    centered = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.float32)
    return (centered * scale.to(torch.float32)).to(torch.float16)


def group_scales(qscale: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """fp16 scale per (group, column): ``fp16(fp16(qs²) · m)`` with ``m`` the fp16 group multiplier."""
    squares = (qscale.to(torch.int32) ** 2).to(torch.float32)
    return (squares * scale_max.to(torch.float32).unsqueeze(1)).to(torch.float16)


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Reject a tensor set the 0.3.2 loader would refuse (dtypes, shapes, exl2-format §2.1 and §2.10)."""
    missing = [s for s in QUANT_SUFFIXES if s not in tensors]
    if missing:
        raise Exl2Error(f"EXL2 layer is missing tensors {missing}")
    dtypes = {"q_weight": torch.int32, "q_scale": torch.int32, "q_scale_max": torch.float16,
              "q_groups": torch.int16, "q_invperm": torch.int32}
    for suffix, dtype in dtypes.items():
        if tensors[suffix].dtype != dtype:
            raise Exl2Error(f"EXL2 tensor {suffix} has dtype {tensors[suffix].dtype}, expected {dtype}")
    q_weight, q_scale = tensors["q_weight"], tensors["q_scale"]
    groups = tensors["q_groups"].numel() // 2
    if q_weight.dim() != 2 or q_weight.shape[1] != 8 * q_scale.shape[1]:
        raise Exl2Error(f"q_weight {tuple(q_weight.shape)} does not match q_scale {tuple(q_scale.shape)}")
    if not q_scale.shape[0] == tensors["q_scale_max"].numel() == groups:
        raise Exl2Error("q_scale, q_scale_max and q_groups disagree on the number of groups")


def dequantize(tensors: dict[str, torch.Tensor], prescale: float = 1.0) -> torch.Tensor:
    """Rebuild the fp16 weight ``[N, K]`` (nn.Linear layout, padded N) from an EXL2 tensor set (exl2-format §2.9).

    Follows the 0.3.2 loader bit for bit: ``q_scale_max`` is multiplied in fp16 by ``prescale / 256``,
    ``perm = argsort(q_invperm)`` and permuted row ``k`` lands on input feature ``perm[k]``.
    """
    check_tensors(tensors)
    codes, group_bits, group_rows = unpack_codes(tensors["q_weight"], tensors["q_groups"])
    invperm = tensors["q_invperm"].to(torch.int64)
    k = codes.shape[0]
    if invperm.numel() != k or not torch.equal(invperm.sort().values, torch.arange(k, device=invperm.device)):
        raise Exl2Error(f"q_invperm is not a permutation of the {k} rows described by q_groups")
    scale_max = tensors["q_scale_max"] * (prescale / 256)
    scales = group_scales(unpack_scales(tensors["q_scale"]), scale_max)
    permuted = torch.empty(codes.shape, dtype=torch.float16, device=codes.device)
    start = 0
    for group, (bits, rows) in enumerate(zip(group_bits, group_rows)):
        permuted[start:start + rows] = fake_quant_values(codes[start:start + rows], bits, scales[group])
        start += rows
    return permuted[invperm].T.contiguous()
