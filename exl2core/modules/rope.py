"""Rotary position embeddings: frequencies for every scaling scheme, and the two rotation layouts.

Frequencies and angles follow the published formulas (as transformers computes them) in float32; their
cosines and sines come from the C library in double precision, rounded to float32. The tables are cast
to the activations' dtype before rotating, so a module's output does not depend on whether the tables
were cached.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.model.config import RopeSpec

ROPE_STYLES = ("neox", "gptj")


def rotary_dim(spec: RopeSpec, head_dim: int) -> int:
    """Channels of each head that are rotated (all of them unless the rotary factor is partial)."""
    return int(head_dim * spec.partial_rotary_factor) // 2 * 2


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _original_context(spec: RopeSpec, max_position: int | None) -> int:
    ctx = spec.original_max_position_embeddings or max_position
    if not ctx:
        raise Exl2Error(f"rope_scaling type '{spec.kind}' needs original_max_position_embeddings")
    return int(ctx)


def _llama3(spec: RopeSpec, inv_freq: torch.Tensor, max_position: int | None) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    context = _original_context(spec, max_position)
    low_wavelen = context / spec.low_freq_factor
    high_wavelen = context / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (context / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(spec: RopeSpec, dim: int, max_position: int | None) -> torch.Tensor:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, linear ramp in between."""
    context = _original_context(spec, max_position)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low = max(math.floor(correction_dim(spec.beta_fast)), 0)
    high = min(math.ceil(correction_dim(spec.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(spec.theta, dim)
    interpolation = extrapolation / spec.factor
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def attention_factor(spec: RopeSpec) -> float:
    """Multiplier of cos/sin: YaRN's mscale (``0.1·ln(factor) + 1`` unless given), else 1."""
    if spec.kind != "yarn":
        return 1.0
    if spec.attention_factor is not None:
        return float(spec.attention_factor)
    return 1.0 if spec.factor <= 1 else 0.1 * math.log(spec.factor) + 1.0


def inv_freq(spec: RopeSpec, dim: int, seq_len: int = 0, max_position: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``[dim/2]`` (float32) of a RoPE spec for sequences of ``seq_len`` tokens."""
    kind = spec.kind
    if kind == "default":
        return _base_inv_freq(spec.theta, dim)
    if kind == "linear":
        return _base_inv_freq(spec.theta, dim) / spec.factor
    if kind == "ntk_alpha":
        return _base_inv_freq(spec.theta * spec.alpha ** (dim / (dim - 2)), dim)
    if kind == "dynamic":
        if not max_position or seq_len <= max_position:
            return _base_inv_freq(spec.theta, dim)
        growth = spec.factor * seq_len / max_position - (spec.factor - 1)
        return _base_inv_freq(spec.theta * growth ** (dim / (dim - 2)), dim)
    if kind == "llama3":
        return _llama3(spec, _base_inv_freq(spec.theta, dim), max_position)
    if kind == "yarn":
        return _yarn(spec, dim, max_position)
    raise Exl2Error(f"unsupported RoPE scaling type '{kind}' "
                    "(supported: default, linear, dynamic, ntk_alpha, llama3, yarn)")


@lru_cache(maxsize=16)
def _tables(spec: RopeSpec, head_dim: int, seq_len: int, style: str, max_position: int | None,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached tables are made outside inference mode, so a later forward under autograd (the sensitivity
    # pass) may use them too.
    with torch.inference_mode(False):
        dim = rotary_dim(spec, head_dim)
        positions = torch.arange(seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq(spec, dim, seq_len, max_position))
        # cos/sin by the C library, then rounded: torch's vectorised kernels (float32, and float64 too) take
        # another code path in about one process in fifty, which made conversions irreproducible.
        scale = attention_factor(spec)
        values = freqs.flatten().tolist()

        def table(f: Callable[[float], float]) -> torch.Tensor:
            t = torch.tensor([f(a) * scale for a in values], dtype=torch.float64).view(freqs.shape).float()
            return (torch.cat((t, t), -1) if style == "neox" else t.repeat_interleave(2, -1)).to(device)

        return table(math.cos), table(math.sin)


def rope_tables(spec: RopeSpec, head_dim: int, seq_len: int, style: str = "neox",
                max_position: int | None = None, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(cos, sin)``, each ``[seq_len, rotary_dim]``, for positions ``0 … seq_len−1``."""
    if style not in ROPE_STYLES:
        raise Exl2Error(f"unknown rope_style '{style}' (expected one of {', '.join(ROPE_STYLES)})")
    return _tables(spec, head_dim, seq_len, style, max_position, torch.device(device))


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    """The 90° partner of each channel: NeoX pairs channel i with i + d/2, GPT-J with its neighbour."""
    if style == "neox":
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox") -> torch.Tensor:
    """Rotate ``x`` (``[..., T, head_dim]``) by position; channels past the rotary dim pass through."""
    dim = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    rot = rot * cos + _rotate(rot, style) * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
