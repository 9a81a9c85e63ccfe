"""Adaptive GPTQ as in exllamav2 0.3.2 (exl2-format §4): Hessian, scale search, quantization loop.

The default scale search differs from exllamav2's: it minimises GPTQ's own Hessian-weighted loss and
refines each column's scale code (``search_scales_hessian``); ``search="exllamav2"`` reproduces exl2-format §4.3.

The quantizer works on the transposed, act-order-permuted weight ``W_p`` of shape ``[K, N]`` (a row is
one input feature). Every fake-quantized value is computed with the same fp16 roundings as the loader's
reconstruction (exl2-format §2.9), so ``QuantizedLinear.weight`` equals ``dequantize(pack())`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exl2core import kernels
from exl2core.errors import Exl2Error
from exl2core.quant.layout import choose_layout
from exl2core.quant.pack import group_scales, make_q_groups, pack_scales
from exl2core.quant.qparams import LAYOUTS, PERCDAMP, SCALE_SEARCHES, QParams, pad32
from exl2core.quant.refine import GroupGrid, refine_codes
from exl2core.quant.rounding import SEARCH_CHUNK_ELEMS, quantize_rows, zero_safe
from exl2core.quant.treesum import LEAF_ROWS, Node, TreeSum, tree_total

DAMP_ATTEMPTS = 10
SCALE_STEPS = 16  # 2 ** scale_bits
MIN_P, MAX_P, P_GRID = 0.70, 1.20, 96
COARSE_STEP = 8  # the first pass of the scale search looks at every 8th grid point

_GRID = [MIN_P * (1 - i / P_GRID) + MAX_P * (i / P_GRID) for i in range(P_GRID + 1)]


@dataclass
class PreparedHessian:
    """Act-order permutation and upper Cholesky factor ``U`` of ``H_p^-1`` (``H_p^-1 = Uᵀ U``).

    ``inv_upper`` is None when prepared for round-to-nearest only. ``attempts`` is the number of damping
    steps that were needed (1 when the first Cholesky succeeded). ``cross`` makes ``quantize_linear`` fit
    the reference output ``X̃ W`` instead of ``X W`` (asymmetric calibration, :class:`Hessian`).
    """

    perm: torch.Tensor
    inv_upper: torch.Tensor | None
    attempts: int = 1
    cross: torch.Tensor | None = None  # permuted mean ``Xᵀ(X̃ − X)`` of an asymmetric Hessian, else None
    source: Hessian | None = None  # the accumulator it was prepared from
    damp: float = 0.0  # the diagonal damping added per attempt

    def damped(self) -> torch.Tensor:
        """The damped, permuted mean ``H_p`` that was inverted, rebuilt from the source by the same steps
        (code refinement's loss): made when needed, so prepared Hessians do not each hold a copy."""
        h = self.source.mean()[self.perm][:, self.perm]
        for _ in range(self.attempts):
            torch.diagonal(h).add_(self.damp)
        return h


@dataclass
class HessianParts:
    """A Hessian accumulated over some of the rows: its batch count and its tree nodes (``quant.treesum``)."""

    in_features: int
    num_batches: int
    asymmetric: bool
    sums: dict[Node, torch.Tensor]
    cross: dict[Node, torch.Tensor]


class Hessian:
    """Accumulates ``H = Σ XᵀX`` in float32 over calibration rows (exl2-format §4.1).

    An ``asymmetric`` accumulator also sums the cross term ``C = Σ Xᵀ(X̃ − X)`` of each row's input ``X``
    (the quantized model's) with the unquantized model's input ``X̃`` to the same linear (GPTAQ,
    arXiv 2504.02692). A row whose two inputs differ in shape (MoE experts routed other tokens in the two
    models) drops the cross term for good: the fit falls back to the plain objective.

    Both sums run over a fixed tree of row chunks (``quant.treesum``), so their bits are the same however
    the rows were split between ranks; ``combined`` joins the parts several ranks accumulated.

    With ``products`` (bfloat16) each row's product is taken in that dtype, rounded once and added in
    float32: the rounding of the input is the one a linear multiplying in that dtype sees, and the
    product's own (a relative 2⁻⁹ per row) averages out over the rows.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", *, asymmetric: bool = False,
                 products: torch.dtype | None = None):
        self.in_features = in_features
        self.device = torch.device(device)
        self.num_batches = 0
        self.asymmetric = asymmetric
        self.products = products
        self._sums = TreeSum()
        self._cross = TreeSum()
        self._totals: tuple[torch.Tensor | None, torch.Tensor | None] | None = None

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, num_batches: int) -> Hessian:
        """Restore an accumulator from its sum and batch count (e.g. one saved by an interrupted job)."""
        hessian = cls(matrix.shape[0], matrix.device)
        hessian._sums.leaf(0, lambda: matrix.to(torch.float32).clone())
        hessian.num_batches = num_batches
        return hessian

    @property
    def matrix(self) -> torch.Tensor | None:
        """``Σ XᵀX`` (None before the first row)."""
        return self._totals_now()[0]

    @property
    def cross(self) -> torch.Tensor | None:
        """``Σ Xᵀ(X̃ − X)`` of an asymmetric accumulator, else None."""
        return self._totals_now()[1] if self.asymmetric else None

    def _totals_now(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self._totals is None:
            self._totals = (tree_total(self._sums.nodes()), tree_total(self._cross.nodes()))
        return self._totals

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None, *, row: int | None = None) -> None:
        """Add one calibration row's input activations ``[..., K]`` (and, asymmetric, the unquantized
        model's input ``reference`` to the same linear for the same row). ``row`` is the calibration row's
        index (rows come in order); without it each call is the next row."""
        if x.shape[-1] != self.in_features:
            raise Exl2Error(f"Hessian expects {self.in_features} input features, got {x.shape[-1]}")
        leaf = (self.num_batches if row is None else row) // LEAF_ROWS
        rows = x.reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        self._totals = None
        self._add_product(self._sums.leaf(leaf, self._zeros), rows, rows)
        self.num_batches += 1
        if not self.asymmetric:
            return
        if reference is None or reference.shape != x.shape:
            self.asymmetric, self._cross = False, TreeSum()
            return
        ref_rows = reference.reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        self._add_product(self._cross.leaf(leaf, self._zeros), rows, ref_rows - rows)  # ref_rows may be the caller's

    def _add_product(self, total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``total += aᵀb``, the product in ``self.products`` when set."""
        if self.products is None:
            total.addmm_(a.T, b)
        else:
            total.add_(torch.mm(a.T.to(self.products), b.to(self.products)))

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.in_features, self.in_features, device=self.device)

    def parts(self) -> HessianParts:
        """What this accumulator holds, for :meth:`combined` on another rank."""
        return HessianParts(self.in_features, self.num_batches, self.asymmetric, self._sums.nodes(),
                            self._cross.nodes() if self.asymmetric else {})

    @classmethod
    def combined(cls, parts: list[HessianParts], device: torch.device | str) -> Hessian:
        """One accumulator from the parts of the same Hessian accumulated over disjoint rows."""
        hessian = cls(parts[0].in_features, device, asymmetric=all(p.asymmetric for p in parts))
        hessian.num_batches = sum(p.num_batches for p in parts)
        sums = {node: t.to(hessian.device) for p in parts for node, t in p.sums.items()}
        cross = {node: t.to(hessian.device) for p in parts for node, t in p.cross.items()}
        hessian._totals = (tree_total(sums), tree_total(cross) if hessian.asymmetric else None)
        return hessian

    def mean(self) -> torch.Tensor:
        """``H / rows`` (a new tensor); with no rows at all (an expert no token was routed to) ``I``."""
        if self.matrix is None or self.num_batches == 0:
            return torch.eye(self.in_features, device=self.device)
        return self.matrix / self.num_batches

    def prepare(self, name: str, *, invert: bool = True, percdamp: float = PERCDAMP) -> PreparedHessian:
        """Normalize, act-order, damp and invert (exl2-format §4.2). ``name`` labels errors.

        Each attempt adds ``percdamp`` times the mean diagonal (0.12 in exllamav2 0.3.2, 0.01 in reference
        GPTQ); damping accumulates over attempts (attempt ``a`` has ``a·damp`` on the diagonal), as in 0.3.2.
        With ``invert=False`` only the permutation is computed (round-to-nearest, exl2-format §4.5).
        """
        h = self.mean()
        if not torch.isfinite(h).all():
            raise Exl2Error(f"{name}: Hessian has NaN/inf entries (non-finite calibration activations)")
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        if not invert:
            return PreparedHessian(perm, None, 0)
        h = h[perm][:, perm]
        cross = None
        if self.cross is not None:
            cross = (self.cross / self.num_batches)[perm][:, perm]
            if not torch.isfinite(cross).all():
                raise Exl2Error(f"{name}: asymmetric cross term has NaN/inf entries")
        damp = max(percdamp * torch.diagonal(h).mean().item(), 1e-5)
        for attempt in range(1, DAMP_ATTEMPTS + 1):
            torch.diagonal(h).add_(damp)
            upper = _inverse_upper_factor(h)
            if upper is not None:
                return PreparedHessian(perm, upper, attempt, cross, self, damp)
        raise Exl2Error(f"{name}: Hessian is not invertible after {DAMP_ATTEMPTS} damping attempts")


def _inverse_upper_factor(h: torch.Tensor) -> torch.Tensor | None:
    """``U`` with ``h^-1 = Uᵀ U``, or None if a Cholesky fails or produces NaN."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        return None
    h_inv = torch.cholesky_inverse(lower)
    if torch.isnan(h_inv).any():
        return None
    upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        return None
    return upper


@dataclass
class GroupScales:
    """Result of the scale search for one group (exl2-format §4.3)."""

    qscale: torch.Tensor  # int16 [N], 1..16
    qscale_max: torch.Tensor  # float16 scalar
    scale: torch.Tensor  # float32 [N], exactly fp16-representable
    divisor: torch.Tensor  # scale with zeros replaced by 1: an all-zero group then rounds to code z


def search_scales(x: torch.Tensor, bits: int) -> GroupScales:
    """exllamav2's scale search (exl2-format §4.3): column codes from the column maxima and the group multiplier
    minimising Σ|error|^3.5.

    The error is evaluated on every 8th point of the 97-point grid and then on the 7 neighbours either
    side of the best of those: 27 instead of 97 evaluations, the dominant cost of quantizing on a CPU.
    The error curve is smooth at that spacing; on real weights the result is the exhaustive argmin
    (checked on every group of a SmolLM2 layer at each bit width), and ties resolve to the lower index
    as in the exhaustive search.
    """
    maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    base_max, qscale, column_scale = _column_codes(x, maxq)
    best = _grid_argmin(lambda m: kernels.grid_errors(x, m, column_scale, zero, maxq), x.device)
    return _at_grid_point(qscale, base_max, best)


def search_scales_hessian(x: torch.Tensor, bits: int, row_weights: torch.Tensor | None = None) -> GroupScales:
    """Scales minimising GPTQ's own loss, the row-weighted squared error Σ_i w_i Σ_n (q − x)², within
    the EXL2 format (exl2core's default; ``row_weights`` None weighs rows equally).

    GPTQ charges row ``i``'s rounding error ``w_i = 1 / U_ii²`` (``U`` the upper Cholesky factor of
    ``H⁻¹``), so the important input features steer the scales. The group multiplier is searched on
    exllamav2's grid (coarse to fine, as in :func:`search_scales`) with the column codes from the column
    maxima; then each column's 4-bit code moves by up to ±2 steps where that lowers the column's own
    error: a column's maximum is often an outlier better clipped than represented.
    """
    maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
    weights = torch.ones(x.shape[0], device=x.device) if row_weights is None else row_weights.to(x.device)
    base_max, qscale, column_scale = _column_codes(x, maxq)
    best = _grid_argmin(lambda m: _weighted_sq_errors(x, m, column_scale, zero, maxq, weights), x.device)
    found = _at_grid_point(qscale, base_max, best)
    candidates = (found.qscale.unsqueeze(0) + _CODE_STEPS.to(x.device).unsqueeze(1)).clamp_(1, SCALE_STEPS)
    multiplier = found.qscale_max * torch.tensor(1 / 256, dtype=torch.float16, device=x.device)
    scales = group_scales(candidates, multiplier.expand(len(candidates))).to(torch.float32)  # [C, N]
    trial = scales.unsqueeze(1)
    err = torch.div(x, zero_safe(trial)).round_().clamp_(-zero, maxq - zero).mul_(trial).sub_(x)
    pick = torch.einsum("crn,r->cn", err.square_(), weights).argmin(0, keepdim=True)
    return _group_result(candidates.gather(0, pick)[0], found.qscale_max, scales.gather(0, pick)[0])


#: Column code moves tried by :func:`search_scales_hessian`, no move first so that ties keep the code.
_CODE_STEPS = torch.tensor([0, -1, 1, -2, 2], dtype=torch.int16)


def _column_codes(x: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(base_max, qscale, column_scale)``: the 4-bit column codes from the column maxima (exl2-format §4.3)."""
    base = (x.abs().amax(0) + 1e-12) / (maxq / 2)
    base_max = base.max()
    qscale = torch.clamp(torch.round(torch.sqrt(base / base_max) * SCALE_STEPS), 1, SCALE_STEPS)
    return base_max, qscale, (qscale / SCALE_STEPS) ** 2 * base_max


def _grid_argmin(errors_of, device: torch.device) -> int:
    """Index of the grid multiplier with the least error: every 8th point, then the best one's neighbours."""
    grid = torch.tensor(_GRID, dtype=torch.float32, device=device)

    def best_of(indices: list[int]) -> int:
        return indices[int(torch.argmin(errors_of(grid[indices])))]

    coarse = best_of(list(range(0, len(_GRID), COARSE_STEP)))
    return best_of(list(range(max(0, coarse - COARSE_STEP + 1), min(len(_GRID), coarse + COARSE_STEP))))


def _at_grid_point(qscale: torch.Tensor, base_max: torch.Tensor, best: int) -> GroupScales:
    """The stored codes and fp16 multiplier for grid point ``best``, and the scales they reconstruct."""
    qscale_max = (base_max * torch.tensor(_GRID[best], device=base_max.device)).to(torch.float16)
    multiplier = qscale_max * torch.tensor(1 / 256, dtype=torch.float16, device=qscale.device)
    scale = group_scales(qscale.unsqueeze(0), multiplier.reshape(1))[0].to(torch.float32)
    return _group_result(qscale, qscale_max, scale)


def _group_result(qscale: torch.Tensor, qscale_max: torch.Tensor, scale: torch.Tensor) -> GroupScales:
    return GroupScales(qscale.to(torch.int16), qscale_max, scale, zero_safe(scale))


def _weighted_sq_errors(x: torch.Tensor, multipliers: torch.Tensor, column_scale: torch.Tensor, zero: int,
                        maxq: int, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Σ_n (q(x) − x)² for each candidate multiplier, chunked like :func:`grid_errors`."""
    errors = torch.empty(len(multipliers), dtype=torch.float32, device=x.device)
    step = max(1, SEARCH_CHUNK_ELEMS.get(x.device.type, 1 << 22) // x.numel())
    for i in range(0, len(multipliers), step):
        trial = (multipliers[i:i + step, None] * column_scale).unsqueeze(1)  # [c, 1, N]
        err = torch.div(x, trial).round_().clamp_(-zero, maxq - zero).mul_(trial).sub_(x)
        errors[i:i + step] = err.square_().sum(2) @ weights
    return errors


@dataclass
class QuantizedLinear:
    """A quantized linear layer: codes and scales in layout order plus its fake-quantized fp16 weight."""

    qparams: QParams
    perm: torch.Tensor
    codes: torch.Tensor
    group_bits: list[int]
    group_rows: list[int]
    qscale: torch.Tensor
    qscale_max: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    out_features: int

    def pack(self) -> dict[str, torch.Tensor]:
        """The EXL2 tensors of exl2-format §2.1 by suffix (``q_weight`` … ``q_invperm`` and ``bias`` if present)."""
        if self.perm.numel() > 1 << 16:
            raise Exl2Error(f"{self.perm.numel()} input features exceed the 65536 the EXL2 loader supports")
        tensors = {
            "q_weight": kernels.pack_codes(self.codes, self.group_bits, self.group_rows),
            "q_scale": pack_scales(self.qscale),
            "q_scale_max": self.qscale_max.to(torch.float16),
            "q_groups": make_q_groups(self.group_bits, self.group_rows).to(self.codes.device),
            "q_invperm": torch.argsort(self.perm).to(torch.int32),
        }
        if self.bias is not None:
            tensors["bias"] = self.bias
        return tensors


def quantize_linear(
    weight: torch.Tensor,
    prepared: PreparedHessian,
    qparams: QParams,
    *,
    bias: torch.Tensor | None = None,
    rtn: bool = False,
    search: str = "hessian",
    asymmetric_weight: float = 1.0,
    layout: str = "table",
    refine: int = 0,
) -> QuantizedLinear:
    """Quantize an ``[out_features, in_features]`` weight with GPTQ error feedback (or RTN, exl2-format §4.5).

    Output features are zero-padded to a multiple of 32 first (exl2-format §2.2). The lazy-update block is the
    group: within a group rows are quantized one at a time and the error is propagated to the group's
    remaining rows; after the group, all later rows are updated with one matrix product (exl2-format §4.4).
    ``search`` picks the group scales (``SCALE_SEARCHES``); both give valid EXL2 tensors.

    A Hessian with a cross term (``prepared.cross``) fits the unquantized model's output ``X̃ W`` from
    the quantized model's input ``X``: ``‖X̃ W − X Q‖²`` equals ``‖X (Q − W*)‖²`` plus a constant, with
    ``W* = W + H⁻¹ Xᵀ(X̃ − X) W`` (the least-squares fit of the reference output, ridge-damped towards
    ``W`` by GPTQ's damping), so GPTQ runs unchanged on ``W*``. ``asymmetric_weight`` scales the
    correction (1: the exact optimum). ``layout`` (``LAYOUTS``) chooses the group layout: ``table`` is
    exl2-format §2.4's; ``hessian`` moves rows between the setting's bit widths and group sizes where GPTQ's
    row-weighted error model says so, at exactly the same storage size (``quant.layout``). ``refine``
    sweeps of coordinate descent (``quant.refine``) then revisit GPTQ's codes at the scales it chose.
    """
    out_features, k = weight.shape
    perm = prepared.perm
    device = perm.device
    if perm.numel() != k:
        raise Exl2Error(f"weight has {k} input features but the Hessian has {perm.numel()}")
    if not rtn and prepared.inv_upper is None:
        raise Exl2Error("GPTQ needs a Hessian prepared with invert=True")
    if search not in SCALE_SEARCHES:
        raise Exl2Error(f"unknown scale search {search!r}; expected one of {', '.join(SCALE_SEARCHES)}")
    if layout not in LAYOUTS:
        raise Exl2Error(f"unknown group layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    n = pad32(out_features)
    w = torch.zeros(n, k, dtype=torch.float32, device=device)
    w[:out_features] = weight.to(device=device, dtype=torch.float32)
    if not torch.isfinite(w).all():
        raise Exl2Error("weight has NaN/inf entries")
    w = w.T[perm].contiguous()
    if prepared.cross is not None and not rtn:
        upper = prepared.inv_upper
        w.add_(upper.T @ (upper @ (prepared.cross @ w)), alpha=asymmetric_weight)
        if not torch.isfinite(w).all():
            raise Exl2Error("asymmetric calibration produced NaN/inf weights")
    row_weights = None if rtn else torch.diagonal(prepared.inv_upper).square().reciprocal()
    groups = choose_layout(w, qparams, layout, row_weights)
    refine = 0 if rtn else refine
    target = w.clone() if refine else None
    grids: list[GroupGrid] = []

    codes = torch.empty(k, n, dtype=torch.int16, device=device)
    fake = torch.empty(k, n, dtype=torch.float32, device=device)
    qscale = torch.empty(len(groups), n, dtype=torch.int16, device=device)
    qscale_max = torch.empty(len(groups), dtype=torch.float16, device=device)
    start = 0
    for index, (bits, rows) in enumerate(groups):
        end = start + rows
        if search == "exllamav2":
            found = search_scales(w[start:end], bits)
        else:
            found = search_scales_hessian(w[start:end], bits, None if rtn else row_weights[start:end])
        qscale[index], qscale_max[index] = found.qscale, found.qscale_max
        if rtn:
            _round_rows(w[start:end], found, bits, codes[start:end], fake[start:end])
        else:
            _gptq_group(w, prepared.inv_upper, start, end, found, bits, codes, fake)
        if refine:
            grids.append(GroupGrid(start, end, bits, found.scale, found.divisor))
        start = end
    if refine:
        refine_codes(target, prepared.damped(), grids, codes, fake, refine)

    padded_bias = None
    if bias is not None:
        padded_bias = torch.zeros(n, dtype=torch.float16, device=device)
        padded_bias[:out_features] = bias.to(device=device, dtype=torch.float16)
    return QuantizedLinear(
        qparams=qparams,
        perm=perm,
        codes=codes,
        group_bits=[b for b, _ in groups],
        group_rows=[r for _, r in groups],
        qscale=qscale,
        qscale_max=qscale_max,
        weight=fake.to(torch.float16)[torch.argsort(perm)].T.contiguous(),  # fp16 first: half the copies
        bias=padded_bias,
        out_features=out_features,
    )


def _row_quantizer(w: torch.Tensor):
    """``kernels.quantize_group`` where the CUDA extension serves ``w``'s device, else ``quantize_rows``
    (decided once per group, so the CPU loop pays no dispatch per row)."""
    return kernels.quantize_group if kernels.extension_for(w) is not None else quantize_rows


def _round_rows(
    w: torch.Tensor, found: GroupScales, bits: int, codes: torch.Tensor, fake: torch.Tensor
) -> None:
    """Round rows to their nearest codes; write codes and fp16-exact fake-quantized values in place."""
    _row_quantizer(w)(w, found.scale, 1 << (bits - 1), (1 << bits) - 1, divisor=found.divisor,
                      out=(codes, fake, None))


def _gptq_group(
    w: torch.Tensor,
    inv_upper: torch.Tensor,
    start: int,
    end: int,
    found: GroupScales,
    bits: int,
    codes: torch.Tensor,
    fake: torch.Tensor,
) -> None:
    """Quantize rows ``start:end`` of ``w`` with error feedback, then lazily update the later rows."""
    errors = torch.empty(end - start, w.shape[1], dtype=torch.float32, device=w.device)
    zero, maxq = 1 << (bits - 1), (1 << bits) - 1
    quantize = _row_quantizer(w)
    for i, row in enumerate(range(start, end)):
        err = errors[i]
        quantize(w[row], found.scale, zero, maxq, inv_upper[row, row], divisor=found.divisor,
                 out=(codes[row], fake[row], err))
        if row + 1 < end:
            w[row + 1:end].addr_(inv_upper[row, row + 1:end], err, alpha=-1)
    if end < w.shape[0]:
        w[end:].addmm_(inv_upper[start:end, end:].T, errors, alpha=-1)


