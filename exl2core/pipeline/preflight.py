"""Checks run before a conversion does any work, so a job that cannot succeed fails in seconds.

Everything here depends only on the settings, the model's shapes, the calibration data and the disks:
the bpw range the candidate tables reach, whether the calibration data holds enough tokens, whether the
work and output directories can be written and whether their file systems have room for what the job
will write. Each failure is one ``Exl2Error`` line.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.plan import ModelPlan, Module, Slot
from exl2core.pipeline.job import DEFAULT_ROW_LENGTH, STAGES, Job, Settings, io_reason, stage_index
from exl2core.pipeline.optimize import Option, bpw_range, measured_slots, options_of
from exl2core.pipeline.records import SlotKey, slot_key
from exl2core.quant.qparams import HEAD_OPTIONS, TABLES, pad32, table_setting

MEASURE_STAGES = ("measure_tokens", "measure_embeddings", "measure")
QUANT_STAGES = ("quant_tokens", "quant_embeddings", "quant")
TOKEN_BYTES = 8  # calibration token ids are int64
#: The bpw tolerance of the target check, as in the optimization stage.
BPW_SLACK = 1e-9
GIB = 1024 ** 3


@dataclass(frozen=True)
class BpwRange:
    """The lowest and highest decoder bpw any choice of candidates reaches."""

    low: float
    high: float

    def check(self, bits: float) -> None:
        if bits < self.low - BPW_SLACK or bits > self.high + BPW_SLACK:
            raise Exl2Error(f"target {bits} bpw is outside what the candidate tables reach for this model "
                            f"({self.low:.3f}–{self.high:.3f} bpw); choose -b in that range")


def slot_keys(plan: ModelPlan) -> list[tuple[Module, Slot, SlotKey]]:
    """Each slot with its module and measurement key (``records.slot_key``), in plan order."""
    return [(m, slot, slot_key(m, slot)) for m in plan.modules for slot in m.slots]


def slot_numel(module: Module, slot: Slot) -> int:
    """Weights of the slot's linears, output features padded to 32 as the bpw budget counts them."""
    return sum(lin.in_features * pad32(lin.out_features) for lin in module.linears if lin.role in slot.roles)


def table_options(plan: ModelPlan) -> list[list[Option]]:
    """Every slot's candidate sizes, from the layer shapes and the candidate tables alone."""
    slots = []
    for module in plan.modules:
        for slot in module.slots:
            linears = [lin for lin in module.linears if lin.role in slot.roles]
            slots.append([Option(sum(table_setting(slot.table, row, lin.role)
                                     .total_bits(lin.in_features, pad32(lin.out_features), lin.bias)
                                     for lin in linears), 0.0)
                          for row in range(len(TABLES[slot.table]))])
    return slots


def attainable_bpw(plan: ModelPlan, measurement: dict | None = None) -> BpwRange:
    """The bpw range of the model's shapes and the tables, or of a measurement's records (``-m``)."""
    if measurement is None:
        options = table_options(plan)
    else:
        options = [options_of(r) for r in measured_slots(measurement, [k for _, _, k in slot_keys(plan)])]
    return BpwRange(*bpw_range(options, plan.blocks_numel()))


def stages_to_run(settings: Settings, start: str) -> list[str]:
    """The stages a job resumed (or started) at ``start`` still runs."""
    stages = list(STAGES[stage_index(start):-1])
    if settings.measurement:
        stages = [s for s in stages if s not in MEASURE_STAGES]
    if settings.output_measurement:
        stages = [s for s in stages if s not in (*QUANT_STAGES, "compile")]
    return stages


@dataclass(frozen=True)
class CalibrationPass:
    """The token rows one pass reads: its rows, their length, the noise rows and the flags that set them."""

    rows: int
    length: int
    noise: int
    flags: str
    stages: tuple[str, ...]
    purpose: str

    def tokens_to_read(self, stages: list[str]) -> bool:
        return self.stages[0] in stages


def calibration_passes(settings: Settings, plan: ModelPlan, stages: list[str]) -> list[CalibrationPass]:
    """The passes with work left among ``stages``."""
    passes = [CalibrationPass(settings.measurement_rows, settings.measurement_length, plan.noise_rows[0],
                              "measurement rows -mr/-ml", MEASURE_STAGES, "measurement"),
              CalibrationPass(settings.rows, settings.length, plan.noise_rows[1], "quantization rows -r/-l",
                              QUANT_STAGES, "quantization")]
    return [p for p in passes if any(s in stages for s in p.stages)]


def default_row_length(plan: ModelPlan) -> int:
    """The calibration row length a job takes unless told otherwise: the default, or the model's longest row
    if shorter (GPT-2's 1024 learned positions)."""
    return min(DEFAULT_ROW_LENGTH, plan.max_length or DEFAULT_ROW_LENGTH)


def check_calibration(settings: Settings, plan: ModelPlan, stages: list[str],
                      read_tokens: Callable[[CalibrationPass], object]) -> None:
    """The dataset has a ``text`` column and enough tokens for every pass still to run: ``read_tokens`` is
    the token stages' own reading, run dry (tokenizing is cheap, embedding is where the hours go)."""
    passes = [p for p in calibration_passes(settings, plan, stages) if p.tokens_to_read(stages)]
    if not passes:
        return
    for p in passes:
        if plan.max_length and p.length > plan.max_length:
            raise Exl2Error(f"{plan.architecture} takes rows of at most {plan.max_length} tokens (its learned "
                            f"positions), not {p.length}: pass {p.flags.split('/')[-1]} {plan.max_length} or less")
    if settings.cal_dataset:
        path = Path(settings.cal_dataset)
        if not path.is_file():
            raise Exl2Error(f"calibration dataset {path} does not exist or is not a file")
        try:
            columns = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:
            raise Exl2Error(f"cannot read calibration dataset {path} as a parquet file: {e}") from None
        if "text" not in columns:
            raise Exl2Error(f"calibration dataset {path.name} has no 'text' column (its columns: "
                            f"{', '.join(columns) or 'none'}); name the column of calibration text 'text'")
    for p in passes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the stage itself warns about long rows
                read_tokens(p)
        except Exl2Error as e:
            raise Exl2Error(f"{e} ({p.flags}: {p.rows} × {p.length})") from None


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where a directory to be created would go."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """``path`` (a directory, created later if need be) can be written: probed with a temporary file, since
    permission bits say nothing about a read-only mount (or for root)."""
    base = existing_ancestor(path)
    if not base.is_dir():
        raise Exl2Error(f"the {what} {path} cannot be created: {base} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".exl2-write-test.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Exl2Error(f"the {what} {path} is not writable ({io_reason(e)} at {base}); choose another "
                        "directory or fix its permissions") from None


@dataclass(frozen=True)
class Write:
    """Bytes a job is expected to add under ``directory``, and what they are."""

    directory: Path
    nbytes: int
    what: str


def _file_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def estimate_writes(settings: Settings, source: SourceModel, plan: ModelPlan, job: Job, stages: list[str],
                    dtype_bytes: int) -> list[Write]:
    """What the remaining stages add to the disks: token ids, the hidden-state checkpoints (old and new
    copy at once), the packed tensors and the compiled model, less what already lies there to be replaced."""
    writes: list[Write] = []
    work = job.dir
    passes = calibration_passes(settings, plan, stages)
    reading = [p for p in passes if p.tokens_to_read(stages)]
    if reading:
        writes.append(Write(work, max((p.rows + p.noise) * p.length for p in reading) * TOKEN_BYTES,
                            "token ids"))
    embed = plan.modules[0].tensors.get("embed")
    width = source.shape(embed)[-1] if embed and source.has(embed) else plan.config.hidden_size
    loops = [p for p in passes if p.stages[-1] in stages]
    if loops:
        # The asymmetric fit's quantization checkpoints also hold the unquantized model's stream.
        streams = {p.purpose: 2 if p.purpose == "quantization" and settings.fit == "asymmetric" else 1
                   for p in loops}
        states = max((p.rows + p.noise) * p.length * streams[p.purpose] for p in loops) * width * dtype_bytes
        held = job.state.get("hidden_states")
        existing = _file_bytes([job.path(held)]) if held else 0
        writes.append(Write(work, max(2 * states - existing, states), "hidden-state checkpoints"))
    packed = packed_bytes(plan, settings.bits, settings.head_bits)
    if "quant" in stages:
        tensor_dir = job.path("out_tensor")
        done = _file_bytes(tensor_dir.glob("*.safetensors")) if tensor_dir.is_dir() else 0
        writes.append(Write(work, max(packed - done, 0), "packed tensors"))
    if "compile" in stages:
        target = Path(settings.compile_full) if settings.compile_full else work
        model = packed + unquantized_bytes(source, plan)
        old = _file_bytes(target.glob("output*.safetensors")) if target.is_dir() else 0
        writes.append(Write(target, max(model - old, 0), "the compiled model"))
    return writes


def packed_bytes(plan: ModelPlan, bits: float, head_bits: int) -> int:
    """The packed decoder at (at most) the target bpw, plus the head at its head bits."""
    total = plan.blocks_numel() * bits
    head = HEAD_OPTIONS[head_bits]
    for module in plan.modules:
        if not module.slots:
            total += sum(head.total_bits(lin.in_features, pad32(lin.out_features), lin.bias)
                         for lin in module.linears)
    return math.ceil(total / 8)


def unquantized_bytes(source: SourceModel, plan: ModelPlan) -> int:
    """Norms, embeddings and carried tensors, written in fp16 (carried ones at about 2 bytes each)."""
    keys = {key for m in plan.modules for key in m.tensors.values()}
    keys |= {key for prefix in plan.carry for key in source.keys() if key.startswith(prefix)}
    return sum(2 * math.prod(source.shape(key)) for key in keys if source.has(key))


def check_space(writes: list[Write]) -> None:
    """Each file system has room for what the job writes to it."""
    by_device: dict[int, list[Write]] = defaultdict(list)
    base_of: dict[int, Path] = {}
    for w in writes:
        base = existing_ancestor(w.directory)
        dev = base.stat().st_dev
        by_device[dev].append(w)
        base_of.setdefault(dev, base)
    for dev, group in by_device.items():
        need = sum(w.nbytes for w in group)
        free = free_bytes(base_of[dev])
        if need > free:
            parts = ", ".join(f"{w.what} {_size(w.nbytes)}" for w in group if w.nbytes)
            raise Exl2Error(f"not enough free space for {', '.join(sorted({str(w.directory) for w in group}))}: "
                            f"the job will write about {_size(need)} there ({parts}) but its file system has "
                            f"{_size(free)} free; free space or choose another directory")


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024 ** 2:.1f} MiB"


def preflight(settings: Settings, source: SourceModel, plan: ModelPlan, job: Job, device: str,
              measurement: dict | None, read_tokens: Callable[[CalibrationPass], object]) -> None:
    """Every check for the stages ``job`` still runs (from ``redo_from`` or its progress), the cheapest
    and most likely mistake first. ``measurement`` is the ``-m`` file's records, whose sizes then bound
    the bpw instead of the tables; ``read_tokens`` reads one pass's calibration tokens."""
    stages = stages_to_run(settings, job.redo_from or job.progress)
    if not stages:
        return
    if "optimize" in stages and not settings.output_measurement:
        attainable_bpw(plan, measurement).check(settings.bits)
    check_calibration(settings, plan, stages, read_tokens)
    check_writable(job.dir, "work directory")
    if settings.compile_full and "compile" in stages:
        check_writable(Path(settings.compile_full), "output directory")
    if settings.output_measurement:
        target = Path(settings.output_measurement)
        check_writable(target if target.is_dir() else target.parent, "measurement output directory")
    dtype = job.state.get("dtype") or ("float16" if device.startswith("cuda") and not plan.fp32_residual
                                       else "float32")
    check_space(estimate_writes(settings, source, plan, job, stages, 2 if dtype == "float16" else 4))
