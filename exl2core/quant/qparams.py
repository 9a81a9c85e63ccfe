"""Quantization settings (exl2-format §3): group layout, size accounting and the candidate tables.

A ``QParams`` is one mixed-precision setting of a linear layer. Its ``desc`` string is the identity used
for de-duplication and printing, so the proportions keep their Python type (int ``1`` prints ``1``, float
``1.0`` prints ``1.0``) exactly as exllamav2 0.3.2 writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from exl2core.errors import Exl2Error

#: How group scales are chosen: ``hessian`` (exl2core's default, ``gptq.search_scales_hessian``) or
#: ``exllamav2`` (its converter's choice exactly, ``gptq.search_scales``).
SCALE_SEARCHES = ("hessian", "exllamav2")

#: How the quantization pass fits each linear (``pipeline.quantize``): ``local`` (exllamav2's: on the
#: inputs its block's unquantized weights give it), ``sequential`` (later linears of a block on what the
#: quantized earlier ones produce) or ``asymmetric`` (sequential, to the unquantized model's output: GPTAQ).
FITS = ("local", "sequential", "asymmetric")

#: Dtypes the quantization pass's forwards may multiply their float32 linears in
#: (``modules.linear.linear_products_in``).
PRODUCT_DTYPES = ("float32", "bfloat16")

#: Group layouts of a setting (``quant.layout``): ``table`` (exl2-format §2.4's) or ``hessian`` (the least expected
#: GPTQ loss among layouts of exactly the same size).
LAYOUTS = ("table", "hessian")

#: GPTQ's damping, the fraction of the Hessian's mean diagonal added before inversion (exl2-format §4.2:
#: exllamav2's; reference GPTQ uses 0.01). The measurement always damps by it; ``--damp`` sets the
#: quantization pass's.
PERCDAMP = 0.12

#: Bit widths the 0.3.2 kernels can dequantize (exl2-format §2.10).
SUPPORTED_BITS = (8, 6, 5, 4, 3, 2)


def pad32(n: int) -> int:
    """Round ``n`` up to a multiple of 32: exllamav2 pads every linear's out_features like this (exl2-format §2.2)."""
    return n + (-n % 32)


@dataclass(frozen=True)
class QParams:
    """One quantization setting: bit widths (descending), their row proportions and group sizes."""

    group_size: dict[int, int]
    bits: tuple[int, ...]
    bits_prop: tuple[float, ...]
    scale_bits: int = 4

    def __post_init__(self) -> None:
        bits = tuple(int(b) for b in self.bits)
        props = tuple(self.bits_prop)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "bits_prop", props)
        object.__setattr__(self, "group_size", _normalize_group_size(self.group_size, bits))
        self._validate()

    def _validate(self) -> None:
        where = f"quantization setting {self.desc!r}"
        if not self.bits or len(self.bits) != len(self.bits_prop):
            raise Exl2Error(f"{where}: bits and bits_prop must be non-empty and of equal length")
        if any(b not in SUPPORTED_BITS for b in self.bits):
            raise Exl2Error(f"{where}: bit widths must be among {sorted(SUPPORTED_BITS)}")
        if any(b1 <= b2 for b1, b2 in zip(self.bits, self.bits[1:])):
            raise Exl2Error(f"{where}: bit widths must be strictly descending (loader requirement)")
        if any(p <= 0 for p in self.bits_prop) or sum(self.bits_prop) != 1:
            raise Exl2Error(f"{where}: proportions must be positive and sum to exactly 1")
        if any(gs <= 0 or gs % 32 for gs in self.group_size.values()):
            raise Exl2Error(f"{where}: group sizes must be positive multiples of 32")
        if self.scale_bits != 4:
            raise Exl2Error(f"{where}: only scale_bits = 4 is supported")

    def __eq__(self, other: object) -> bool:
        """Settings are identified by ``desc``, as in the exl2-format §3.7 de-duplication (so ``1`` ≠ ``1.0``)."""
        return isinstance(other, QParams) and self.desc == other.desc

    def __hash__(self) -> int:
        return hash(self.desc)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QParams:
        """Build from the dict form (exl2-format §3.2); ``group_size`` may be an int, a list or a str/int-keyed dict."""
        try:
            return cls(d["group_size"], d["bits"], d["bits_prop"], d.get("scale_bits", 4))
        except (KeyError, TypeError, ValueError) as exc:
            raise Exl2Error(f"invalid quantization setting {d!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict form of exl2-format §3.2 (group_size keys are strings, in ``bits`` order)."""
        return {
            "group_size": {str(b): self.group_size[b] for b in self.bits},
            "bits": list(self.bits),
            "bits_prop": list(self.bits_prop),
            "scale_bits": self.scale_bits,
        }

    @property
    def desc(self) -> str:
        """Description string of exl2-format §3.2, e.g. ``0.05:3b_64g/0.95:2b_64g s4``."""
        parts = [f"{p}:{b}b_{self.group_size[b]}g" for b, p in zip(self.bits, self.bits_prop)]
        return "/".join(parts) + f" s{self.scale_bits}"

    def group_counts(self, rows: int) -> list[int]:
        """Number of groups per bit width for a matrix with ``rows`` input features (exl2-format §2.4)."""
        remaining = rows
        counts = []
        for b, p in zip(self.bits, self.bits_prop):
            gs = self.group_size[b]
            count = math.ceil(min(rows * p, remaining) / gs)
            if count < 0:
                raise Exl2Error(f"{self.desc}: over-covering group layout for {rows} rows")
            remaining -= count * gs
            counts.append(count)
        if remaining > 0:
            raise Exl2Error(f"{self.desc}: groups do not cover all {rows} rows")
        return counts

    def groups(self, rows: int) -> list[tuple[int, int]]:
        """``[(bits, nrows)]`` per group in layout order over the permuted rows (exl2-format §2.4)."""
        layout = []
        start = 0
        for b, count in zip(self.bits, self.group_counts(rows)):
            gs = self.group_size[b]
            for _ in range(count):
                layout.append((b, min(gs, rows - start)))
                start += gs
        return layout

    def total_bits(self, rows: int, columns: int, bias: bool = False) -> int:
        """Storage cost in bits of the packed layer (exl2-format §3.3); ``columns`` is the padded out_features."""
        weight_bits = 0
        remaining = rows
        counts = self.group_counts(rows)
        for b, count in zip(self.bits, counts):
            r = min(self.group_size[b] * count, remaining)
            remaining -= r
            weight_bits += r * columns * b
        num_groups = sum(counts)
        total = weight_bits + num_groups * 16 + num_groups * 32 + num_groups * columns * self.scale_bits
        total += rows * 32
        if bias:
            total += 16 * columns
        return total

    def bpw(self, rows: int, columns: int, bias: bool = False) -> float:
        """Bits per weight, the bias counted as extra weights (exl2-format §3.3)."""
        numel = rows * columns + (columns if bias else 0)
        return self.total_bits(rows, columns, bias) / numel


def _normalize_group_size(group_size: Any, bits: tuple[int, ...]) -> dict[int, int]:
    """Map every bit width to its group size, accepting the three input forms of exl2-format §3.1."""
    if isinstance(group_size, int):
        return {b: group_size for b in bits}
    if isinstance(group_size, (list, tuple)):
        if len(group_size) != len(bits):
            raise Exl2Error(f"group_size list {list(group_size)} does not match bits {list(bits)}")
        return {b: int(gs) for b, gs in zip(bits, group_size)}
    if isinstance(group_size, dict):
        by_bits = {int(k): int(v) for k, v in group_size.items()}
        missing = [b for b in bits if b not in by_bits]
        if missing:
            raise Exl2Error(f"group_size {group_size} has no entry for bits {missing}")
        return {b: by_bits[b] for b in bits}
    raise Exl2Error(f"group_size must be an int, list or dict, not {type(group_size).__name__}")


def _q(spec: str) -> QParams:
    """Parse the compact table notation ``p:b@gs / p:b@gs`` used in exl2-format §3.4–3.5."""
    bits, props, sizes = [], [], {}
    for entry in spec.split("/"):
        prop, rest = entry.strip().split(":")
        b, gs = (int(v) for v in rest.split("@"))
        bits.append(b)
        props.append(int(prop) if prop == "1" else float(prop))
        sizes[b] = gs
    return QParams(sizes, bits, props)


_ATTN_ROWS = [
    # q_proj (= k_proj), v_proj, o_proj
    (".05:3@64/.95:2@64", ".05:3@64/.95:2@64", ".05:3@64/.95:2@64"),
    (".1:3@64/.9:2@64", ".25:3@64/.75:2@64", ".1:3@64/.9:2@64"),
    (".1:3@64/.9:2@64", ".1:4@128/.9:3@128", ".1:3@64/.9:2@64"),
    (".1:3@64/.9:2@64", ".1:4@128/.9:3@128", ".1:4@128/.9:3@128"),
    (".1:4@128/.9:3@128", ".1:4@128/.9:3@128", ".1:4@128/.9:3@128"),
    (".1:4@128/.9:3@128", ".1:4@64/.9:3@64", ".1:4@128/.9:3@128"),
    ("1:4@128", "1:4@128", "1:4@128"),
    ("1:4@128", "1:4@64", "1:4@128"),
    ("1:4@64", "1:4@32", "1:4@64"),
    ("1:4@32", "1:4@32", "1:4@32"),
    (".1:5@128/.9:4@128", ".1:5@64/.9:4@64", ".1:5@128/.9:4@128"),
    (".1:5@64/.9:4@64", ".1:5@32/.9:4@32", ".1:5@64/.9:4@64"),
    (".1:5@64/.9:4@64", "1:5@64", ".1:5@64/.9:4@64"),
    (".1:5@32/.9:4@32", "1:5@32", ".1:5@32/.9:4@32"),
    (".1:6@128/.9:5@128", "1:6@128", ".1:6@128/.9:5@128"),
    (".1:6@32/.9:5@32", "1:6@32", ".1:6@32/.9:5@32"),
    ("1:6@128", "1:6@128", "1:6@128"),
    ("1:6@32", "1:8@32", "1:6@32"),
    ("1:8@128", "1:8@128", "1:8@128"),
]

_MLP_ROWS = [
    # gate_proj, up_proj, down_proj
    (".05:3@64/.95:2@64", ".05:3@64/.95:2@64", ".05:6@32/.2:3@64/.75:2@64"),
    (".1:3@64/.9:2@64", ".25:3@64/.75:2@64", ".05:6@32/.2:3@64/.75:2@64"),
    (".1:3@64/.9:2@64", ".3:3@64/.7:2@64", ".05:5@32/.95:3@32"),
    (".1:3@64/.9:2@64", ".3:3@64/.7:2@64", ".05:5@32/.95:4@32"),
    (".1:4@128/.9:3@128", ".25:4@128/.75:3@128", ".05:8@32/.1:4@128/.85:3@128"),
    (".1:4@32/.9:3@32", ".25:4@32/.75:3@32", ".05:8@32/.1:4@32/.85:3@32"),
    (".1:4@32/.9:3@32", ".25:4@32/.75:3@32", ".05:8@32/.95:4@128"),
    ("1:4@128", "1:4@32", ".05:8@32/.95:4@128"),
    ("1:4@32", "1:4@32", ".05:8@32/.95:4@32"),
    (".1:5@128/.9:4@128", ".25:5@128/.75:4@128", ".05:8@32/.1:5@128/.85:4@128"),
    (".1:5@32/.9:4@32", ".25:5@32/.75:4@32", ".05:8@32/.1:5@32/.85:4@32"),
    (".1:6@128/.9:5@128", ".25:6@128/.75:5@128", ".05:8@32/.1:6@128/.85:5@128"),
    (".1:6@32/.9:5@32", ".25:6@32/.75:5@32", ".05:8@32/.1:6@32/.85:5@32"),
    ("1:6@128", "1:6@128", ".05:8@32/.95:6@128"),
    (".1:8@128/.9:6@128", ".1:8@128/.9:6@128", ".15:8@128/.85:6@128"),
    (".1:8@128/.9:6@128", ".1:8@128/.9:6@128", "1:8@128"),
    ("1:8@128", "1:8@128", "1:8@128"),
]

ATTN_TABLE: list[dict[str, QParams]] = [
    {"q_proj": _q(qk), "k_proj": _q(qk), "v_proj": _q(v), "o_proj": _q(o)} for qk, v, o in _ATTN_ROWS
]
MLP_TABLE: list[dict[str, QParams]] = [
    {"gate_proj": _q(g), "up_proj": _q(u), "down_proj": _q(d)} for g, u, d in _MLP_ROWS
]
TABLES: dict[str, list[dict[str, QParams]]] = {"attn": ATTN_TABLE, "mlp": MLP_TABLE}

#: MoE expert roles and the MLP-table column they are quantized with.
ROLE_COLUMN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

#: lm_head settings selected directly by ``head_bits`` (exl2-format §3.6); 8 uses the float proportion 1.0.
HEAD_OPTIONS: dict[int, QParams] = {
    2: QParams(32, [4, 2], [0.3, 0.7]),
    3: QParams(32, [4, 3], [0.15, 0.85]),
    4: QParams(32, [6, 4], [0.15, 0.85]),
    5: QParams(128, [6, 5], [0.15, 0.85]),
    6: QParams(128, [8, 6], [0.15, 0.85]),
    8: QParams(128, [8], [1.0]),
}


def _table(table: str) -> list[dict[str, QParams]]:
    if table not in TABLES:
        raise Exl2Error(f"unknown candidate table {table!r} (expected one of {sorted(TABLES)})")
    return TABLES[table]


def table_setting(table: str, row: int, role: str) -> QParams:
    """The setting of projection ``role`` in row ``row`` of ``table``; MoE roles map via ROLE_COLUMN."""
    rows = _table(table)
    if not 0 <= row < len(rows):
        raise Exl2Error(f"{table} table has rows 0..{len(rows) - 1}, not {row}")
    column = ROLE_COLUMN.get(role, role)
    if column not in rows[row]:
        raise Exl2Error(f"{table} table has no column for role {role!r}")
    return rows[row][column]


def distinct_settings(table: str, role: str) -> tuple[list[QParams], list[int]]:
    """De-duplicate one column of a table by ``desc`` in first-seen order (exl2-format §3.7).

    Returns the distinct settings and, for each table row, the index of its setting in that list, so
    each distinct setting is quantized once and table rows are evaluated by swapping weights.
    """
    distinct: list[QParams] = []
    index_of: dict[str, int] = {}
    row_index = []
    for row in range(len(_table(table))):
        qp = table_setting(table, row, role)
        if qp.desc not in index_of:
            index_of[qp.desc] = len(distinct)
            distinct.append(qp)
        row_index.append(index_of[qp.desc])
    return distinct, row_index
