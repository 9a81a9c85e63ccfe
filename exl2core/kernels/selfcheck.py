"""Each CUDA kernel proves itself before use: a few small random cases against its PyTorch reference.

On the first kernel call of a process the loaded extension's kernels run these cases (codes, packing and
dequantization bit-exact; the scale-search sums within ``GRID_RTOL``, the matmul within ``MATMUL_TOL``
of a float64 product). The outcome is cached beside the built library, keyed by its size and mtime, so
later processes of the same build skip the cases. A kernel that fails (or raises) is disabled with one
line on stderr naming it, and its callers take the PyTorch path; the others stay in use.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exl2core.kernels import build
from exl2core.kernels.layout import FUSED_MATMUL_MAX_ROWS, group_tables, prepare_matrix

KERNELS = build.KERNELS
CASES = 3
GRID_RTOL = 1e-4
MATMUL_TOL = 2e-3  # relative to the largest output, as fp16 accumulation allows
#: Bumped whenever the cases change, so cached outcomes of older cases are not trusted.
CHECK_VERSION = 1
CACHE_NAME = "selfcheck.json"
_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class KernelState:
    """A kernel's self-check outcome: ``usable`` and a one-line ``detail`` (what passed, or what differed).

    ``raised``: the kernel raised instead of answering (maybe out of memory), so the outcome is not cached
    and the next process checks it again."""

    name: str
    usable: bool
    detail: str
    raised: bool = False


@dataclass
class CheckedExtension:
    """A loaded extension, the device type its kernels serve, and each kernel's state."""

    module: object
    device: str
    states: dict[str, KernelState]

    def kernel(self, name: str) -> Callable | None:
        """The kernel's callable if it passed its self-check, else None."""
        state = self.states.get(name)
        return getattr(self.module, name) if state is not None and state.usable else None


class Mismatch(Exception):
    """A kernel's result differs from its reference (the message says how)."""


# -- cases ---------------------------------------------------------------------------------------------


def _layout(gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Random descending-width groups of 32–128 rows, three widths (over the cases, any width occurs)."""
    widths = sorted((_BITS[i] for i in torch.randperm(len(_BITS), generator=gen)[:3].tolist()), reverse=True)
    group_bits, group_rows = [], []
    for bits in widths:
        for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
            group_bits.append(bits)
            group_rows.append(32 * int(torch.randint(1, 5, (1,), generator=gen)))
    return group_bits, group_rows


def _random_layer(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random EXL2 tensor set on the CPU (codes packed by the reference)."""
    from exl2core.quant import pack

    group_bits, group_rows = _layout(gen)
    n = 32 * int(torch.randint(1, 5, (1,), generator=gen))
    k = sum(group_rows)
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen) for b, r in zip(group_bits, group_rows)])
    return {
        "q_weight": pack.pack_codes(codes, group_bits, group_rows),
        "q_scale": pack.pack_scales(torch.randint(1, 17, (len(group_bits), n), generator=gen)),
        "q_scale_max": (torch.rand(len(group_bits), generator=gen) * 0.1 + 0.01).half(),
        "q_groups": pack.make_q_groups(group_bits, group_rows),
        "q_invperm": torch.argsort(torch.randperm(k, generator=gen)).to(torch.int32),
    }


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """Floats as their bit patterns, so NaNs and signed zeros compare exactly too."""
    views = {torch.float16: torch.int16, torch.float32: torch.int32}
    return t.view(views[t.dtype]) if t.dtype in views else t


def _exact(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise Mismatch(f"{name}: {got.dtype} {tuple(got.shape)} where the reference gives "
                       f"{expected.dtype} {tuple(expected.shape)}")
    same = _as_bits(got.cpu()) == _as_bits(expected)
    if not bool(same.all()):
        raise Mismatch(f"{name}: {int((~same).sum())} of {same.numel()} values not bit-exact")


def _close(name: str, got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    if got.shape != expected.shape:
        raise Mismatch(f"{name}: shape {tuple(got.shape)} where the reference gives {tuple(expected.shape)}")
    diff = (got.cpu().double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool(torch.isfinite(got.cpu()).all()) or bool((diff > bound).any()):
        raise Mismatch(f"{name}: max |Δ| {diff.max().item():.3g} beyond rtol {rtol:g}, atol {atol:.3g}")


def check_quantize_rows(fn: Callable, device: str, gen: torch.Generator) -> None:
    from exl2core.quant.rounding import quantize_rows

    bits = _BITS[int(torch.randint(0, len(_BITS), (1,), generator=gen))]
    rows, cols = int(torch.randint(1, 9, (1,), generator=gen)), 32 * int(torch.randint(1, 4, (1,), generator=gen))
    w = torch.randn(rows, cols, generator=gen) * torch.exp(torch.randn(cols, generator=gen))
    scale = (w.abs().amax(0) / (1 << (bits - 1))).half().float()
    scale[0] = 0.0  # an all-zero column rounds to the zero point
    w[:, 0] = 0.0
    diag = torch.rand(rows, generator=gen) + 0.5
    zero, maxq = 1 << (bits - 1), (1 << bits) - 1
    expected = quantize_rows(w, scale, zero, maxq, diag)
    on = [t.to(device) for t in (w, scale, diag)]
    out = (torch.empty(rows, cols, dtype=torch.int16, device=device),
           torch.empty(rows, cols, device=device), torch.empty(rows, cols, device=device))
    fn(on[0], on[1], on[2], zero, maxq, *out)
    for label, got, want in zip(("codes", "q", "err"), out, expected):
        _exact(f"{bits}-bit {label}", got, want)


def check_grid_errors(fn: Callable, device: str, gen: torch.Generator) -> None:
    from exl2core.quant.rounding import grid_errors

    bits = _BITS[int(torch.randint(0, len(_BITS), (1,), generator=gen))]
    x = torch.randn(int(torch.randint(1, 40, (1,), generator=gen)), 96, generator=gen)
    maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    column_scale = (x.abs().amax(0) + 1e-12) / (maxq / 2)
    multipliers = torch.linspace(0.7, 1.2, 17)
    expected = grid_errors(x, multipliers, column_scale, zero, maxq)
    got = fn(x.to(device), multipliers.to(device), column_scale.to(device), zero, maxq)
    _close(f"{bits}-bit sums", got, expected, GRID_RTOL, 0.0)


def _tables(tensors: dict[str, torch.Tensor], device: str):
    from exl2core.quant.pack import group_layout

    group_bits, group_rows = group_layout(tensors["q_groups"], tensors["q_weight"].shape[0])
    return group_tables(group_bits, group_rows, torch.device(device))


def check_pack_codes(fn: Callable, device: str, gen: torch.Generator) -> None:
    from exl2core.quant import pack

    tensors = _random_layer(gen)
    codes, _, _ = pack.unpack_codes(tensors["q_weight"], tensors["q_groups"])
    t = _tables(tensors, device)
    got = fn(codes.to(device), t.bits, t.row_start, t.qrow_start, t.word_group)
    _exact("q_weight", got, tensors["q_weight"])


def check_unpack_codes(fn: Callable, device: str, gen: torch.Generator) -> None:
    from exl2core.quant import pack

    tensors = _random_layer(gen)
    codes, _, _ = pack.unpack_codes(tensors["q_weight"], tensors["q_groups"])
    t = _tables(tensors, device)
    _exact("codes", fn(tensors["q_weight"].to(device), t.bits, t.row_start, t.qrow_start, t.row_group), codes)


def _prepared(tensors: dict[str, torch.Tensor], device: str, prescale: float):
    return prepare_matrix({k: v.to(device) for k, v in tensors.items()}, prescale)


def check_dequantize(fn: Callable, device: str, gen: torch.Generator) -> None:
    from exl2core.quant import pack

    tensors = _random_layer(gen)
    prescale = float(torch.rand(1, generator=gen)) + 0.5
    p = _prepared(tensors, device, prescale)
    t = p.tables
    got = fn(p.tensors["q_weight"], p.tensors["q_scale"], p.scale_max, p.invperm, t.bits, t.row_start,
             t.qrow_start, t.row_group)
    _exact("weight", got, pack.dequantize(tensors, prescale))


def check_exl2_matmul(fn: Callable, device: str, gen: torch.Generator) -> None:
    from exl2core.quant import pack

    tensors = _random_layer(gen)
    p = _prepared(tensors, device, 1.0)
    t = p.tables
    m = int(torch.randint(1, FUSED_MATMUL_MAX_ROWS + 1, (1,), generator=gen))
    x = torch.randn(m, t.rows, generator=gen).half()
    expected = x.double() @ pack.dequantize(tensors).double().T
    got = fn(x.to(device), p.perm, p.tensors["q_weight"], p.tensors["q_scale"], p.scale_max, t.bits,
             t.qrow_start, t.row_start, t.chunk_group())
    if got.dtype != torch.float16:
        raise Mismatch(f"output is {got.dtype}, not float16")
    _close(f"{m}-row product", got, expected, MATMUL_TOL, MATMUL_TOL * expected.abs().max().item())


CHECKS: dict[str, Callable[[Callable, str, torch.Generator], None]] = {
    "quantize_rows": check_quantize_rows,
    "grid_errors": check_grid_errors,
    "pack_codes": check_pack_codes,
    "unpack_codes": check_unpack_codes,
    "dequantize": check_dequantize,
    "exl2_matmul": check_exl2_matmul,
}
_TOLERANCE = {"grid_errors": f"within rtol {GRID_RTOL:g}", "exl2_matmul": f"within {MATMUL_TOL:g} of max |y|"}


def check_kernel(module: object, name: str, device: str) -> KernelState:
    """Run ``name``'s cases on ``device``; a mismatch or an exception disables it."""
    fn = getattr(module, name, None)
    if fn is None:
        return KernelState(name, False, "missing from the built extension")
    gen = torch.Generator().manual_seed(KERNELS.index(name))
    try:
        for _ in range(CASES):
            CHECKS[name](fn, device, gen)
    except Mismatch as e:
        return KernelState(name, False, f"differs from the PyTorch reference: {e}")
    except Exception as e:  # noqa: BLE001 -- whatever a kernel raises disables it instead of the run
        return KernelState(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}", True)
    return KernelState(name, True, f"passed {CASES} random cases ({_TOLERANCE.get(name, 'bit-exact')})")


def check_all(module: object, device: str) -> dict[str, KernelState]:
    return {name: check_kernel(module, name, device) for name in KERNELS}


# -- the per-process state and its cache ---------------------------------------------------------------


def _library_identity(library: Path) -> dict[str, int] | None:
    try:
        stat = library.stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "version": CHECK_VERSION}


def read_cache(directory: Path) -> dict[str, KernelState] | None:
    """Cached states of the library in ``directory``, if they belong to it and to these cases."""
    identity = _library_identity(directory / f"{build.EXTENSION_NAME}.so")
    try:
        cached = json.loads((directory / CACHE_NAME).read_text())
        if identity is None or cached.get("library") != identity:
            return None
        states = {s["name"]: KernelState(**s) for s in cached["kernels"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return states if set(states) == set(KERNELS) else None


def write_cache(directory: Path, states: dict[str, KernelState]) -> None:
    """Keep the outcome for later processes of this build, unless a kernel raised (check it again then)."""
    if any(state.raised for state in states.values()):
        return
    identity = _library_identity(directory / f"{build.EXTENSION_NAME}.so")
    if identity is None:
        return
    payload = {"library": identity, "kernels": [asdict(s) for s in states.values()]}
    tmp = directory / f".{CACHE_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(directory / CACHE_NAME)
    except OSError:
        pass  # a read-only cache only costs the cases again next time


def announce(states: dict[str, KernelState]) -> None:
    """One stderr line per disabled kernel."""
    for state in states.values():
        if not state.usable:
            print(f"exl2core: CUDA kernel {state.name} disabled ({state.detail}); using the PyTorch path",
                  file=sys.stderr, flush=True)


_lock = threading.Lock()
_checked: CheckedExtension | None = None
_decided = False


def checked_extension() -> CheckedExtension | None:
    """The process's extension with each kernel's state (loading and checking it once), or None."""
    global _checked, _decided
    if _decided:
        return _checked
    with _lock:
        if not _decided:
            module = build.load_extension()
            if module is not None:
                directory = build.build_dir()
                states = read_cache(directory)
                if states is None:
                    states = check_all(module, "cuda")
                    write_cache(directory, states)
                announce(states)
                _checked = CheckedExtension(module, "cuda", states)
            _decided = True
        return _checked


def install(module: object, device: str) -> CheckedExtension:
    """Test hook: check ``module``'s kernels on ``device`` (no cache) and use them for tensors there."""
    global _checked, _decided
    with _lock:
        states = check_all(module, device)
        announce(states)
        _checked, _decided = CheckedExtension(module, device, states), True
        return _checked


def reset() -> None:
    """Forget the process's decision (tests, after environment changes)."""
    global _checked, _decided
    with _lock:
        _checked, _decided = None, False


def installed() -> CheckedExtension | None:
    """The process's checked extension if already decided, without loading anything (the hot path)."""
    return _checked if _decided else None
