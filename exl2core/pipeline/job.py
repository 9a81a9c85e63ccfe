"""Job state: everything about a conversion lives in its working directory.

``job.json`` holds the settings and the progress; large state (token ids, hidden states, packed
tensors) lives beside it. Every write is atomic (temp file, fsync, rename), so a job killed at any
moment resumes from its last checkpoint and reproduces an uninterrupted run byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from exl2core.errors import Exl2Error
from exl2core.pipeline.calibration_mix import DEFAULT_MIX, LEGACY_MIX
from exl2core.quant.qparams import PERCDAMP

JOB_FILE = "job.json"
#: Tokens per calibration row unless the user says otherwise (exllamav2's default; the CLI caps it at the
#: model's longest row, ``ModelPlan.max_length``).
DEFAULT_ROW_LENGTH = 2048
STAGES = ("begin", "measure_tokens", "measure_embeddings", "measure", "optimize", "quant_tokens",
          "quant_embeddings", "quant", "compile", "finished")


def _stage(stage: str, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, **extra}


@dataclass
class Settings:
    """The user's choices that define a job's result.

    Each field's ``metadata["stage"]`` is the first stage of ``STAGES`` it affects: a resumed job may take
    another value for a field whose stage comes after its finished measurement (that stage is redone),
    never for one that would change the measurement. ``metadata["legacy"]``, where present, is the value
    a job.json written before the field existed implies (otherwise the field's default).
    """

    in_dir: str = field(metadata=_stage("begin"))
    cal_dataset: str | None = field(default=None, metadata=_stage("measure_tokens"))
    bits: float = field(default=4.125, metadata=_stage("optimize"))
    head_bits: int = field(default=6, metadata=_stage("quant"))
    rows: int = field(default=100, metadata=_stage("quant_tokens"))
    length: int = field(default=DEFAULT_ROW_LENGTH, metadata=_stage("quant_tokens"))
    measurement_rows: int = field(default=16, metadata=_stage("measure_tokens"))
    measurement_length: int = field(default=DEFAULT_ROW_LENGTH, metadata=_stage("measure_tokens"))
    shard_size: float = field(default=8192, metadata=_stage("compile"))
    compile_full: str | None = field(default=None, metadata=_stage("compile"))
    rope_scale: float | None = field(default=None, metadata=_stage("measure"))
    rope_alpha: float | None = field(default=None, metadata=_stage("measure"))
    output_measurement: str | None = field(default=None, metadata=_stage("optimize"))
    measurement: str | None = field(default=None, metadata=_stage("begin"))
    arch: str | None = field(default=None, metadata=_stage("begin"))
    seed: int = field(default=0, metadata=_stage("measure_tokens"))
    # Jobs from before the scale-search setting quantized with exllamav2's search.
    scale_search: str = field(default="hessian", metadata=_stage("measure", legacy="exllamav2"))
    # ``measure.MEASURE_MODES``; jobs from before the option measured exactly.
    measure: str = field(default="fast", metadata=_stage("measure", legacy="exact"))
    # ``marginal.SENSITIVITY_MODES`` (fast and hessian measurement); jobs from before the option used the
    # Fisher prediction alone.
    sensitivity: str = field(default="isolated", metadata=_stage("measure", legacy="fisher"))
    # Vocabulary entries drawn per token for the marginal-KL pass's KLs (0: the whole vocabulary, as jobs from
    # before the setting).
    kl_samples: int = field(default=256, metadata=_stage("measure", legacy=0))
    # How the quantization pass fits each linear and lays out its groups (pipeline.quantize); jobs from
    # before these settings used exllamav2's local fit and the table layout.
    fit: str = field(default="asymmetric", metadata=_stage("quant", legacy="local"))
    layout: str = field(default="table", metadata=_stage("quant", legacy="table"))
    # Share of the asymmetric fit's correction applied (``QuantizerOptions.fit_strength``); jobs from before
    # the setting applied all of it.
    fit_strength: float = field(default=0.5, metadata=_stage("quant", legacy=1.0))
    # Coordinate-descent sweeps over GPTQ's codes (``quant.refine``); jobs from before the setting made none.
    refine: int = field(default=2, metadata=_stage("quant", legacy=0))
    # GPTQ's damping in the quantization pass (``QuantizerOptions.damp``); the measurement keeps exllamav2's.
    damp: float = field(default=PERCDAMP, metadata=_stage("quant", legacy=PERCDAMP))
    # Strength of the gradient-weighted tokens in the quantization Hessians (``pipeline.token_weights``);
    # jobs from before the setting weighed every token alike.
    token_weight: float = field(default=0.25, metadata=_stage("quant", legacy=0.0))
    # Dtype the quantization pass's forwards multiply their float32 linears in (``quant.qparams.PRODUCT_DTYPES``);
    # jobs from before the setting multiplied in float32.
    matmul_dtype: str = field(default="float32", metadata=_stage("quant", legacy="float32"))
    # Version of the built-in calibration mix (pipeline.calibration_mix.MIXES); jobs from before the setting
    # calibrated with v1.
    cal_mix: str = field(default=DEFAULT_MIX, metadata=_stage("measure_tokens", legacy=LEGACY_MIX))

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "Settings":
        """The settings a job.json records; a field it lacks takes its legacy value or default."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(saved) - set(known))
        if unknown:
            raise Exl2Error(f"the job's settings include {', '.join(unknown)}, unknown to this exl2core "
                            "version; resume it with the version that started it, or -nr to start over")
        legacy = {name: f.metadata["legacy"] for name, f in known.items()
                  if "legacy" in f.metadata and name not in saved}
        return cls(**{**legacy, **saved})

    def changes_from(self, old: "Settings") -> list["SettingChange"]:
        """The fields that differ from ``old``, each with the first stage it affects."""
        return [SettingChange(f.name, getattr(old, f.name), getattr(self, f.name), field_stage(f))
                for f in fields(self) if getattr(self, f.name) != getattr(old, f.name)]

    def differences(self, other: "Settings") -> list[str]:
        return [str(change) for change in self.changes_from(other)]


def field_stage(f: Field) -> str:
    """The first stage a settings field affects; a field that does not say is taken to affect them all."""
    stage = f.metadata.get("stage", STAGES[0])
    if stage not in STAGES:
        raise ValueError(f"Settings.{f.name}: stage {stage!r} is not one of STAGES")
    return stage


@dataclass(frozen=True)
class SettingChange:
    """A setting whose value differs from the one a job was started with."""

    name: str
    old: Any
    new: Any
    stage: str

    def __str__(self) -> str:
        return f"{self.name}: {self.old!r} (job) vs {self.new!r} (now)"


#: The stage a module loop restarts from: its input hidden states are dropped once the pass is finished.
LOOP_START = {"measure": "measure_embeddings", "quant": "quant_embeddings"}
#: The last stage whose work goes into the measurement; settings that affect it or an earlier one may not
#: change once the job is past it.
MEASUREMENT_STAGE = "measure"


def stage_index(stage: str) -> int:
    return STAGES.index(stage)


_UMASK = os.umask(0)
os.umask(_UMASK)


_REASONS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded"}


def io_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of a SafetensorError wrapping one (its message ends "(os error N)")."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"os error (\d+)", str(e))
    return int(found.group(1)) if found else None


class WriteError(Exl2Error):
    """A failed write, as one line naming what could not be written, why, and how to go on."""

    def __init__(self, what: str | Path, reason: str):
        super().__init__(f"cannot write {what}: {reason}; work already checkpointed is kept, "
                         "free space or fix permissions and rerun the same command to resume")
        self.reason = reason


def io_reason(e: BaseException) -> str:
    """A few words for why an I/O call failed: "disk full", "read-only file system" …"""
    code = io_errno(e)
    return _REASONS.get(code) or (os.strerror(code) if code else str(e))


def disk_error(path: str | Path, e: BaseException) -> WriteError:
    return WriteError(path, io_reason(e))


#: The name of :func:`atomic_write`'s temporary file for ``name``: ``.name.`` + mkstemp's 8 characters + ``.tmp``.
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def remove_temporaries(directory: str | Path) -> None:
    """Delete the temporary files of writes killed mid-way (SIGKILL skips :func:`atomic_write`'s cleanup)
    anywhere under ``directory``; other files are left alone."""
    for path in Path(directory).rglob(".*.tmp"):
        if path.is_file() and _TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` and rename it into place, durably; on an I/O error
    (safetensors reports those as ``SafetensorError``) the temporary file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:  # Ctrl-C mid-write leaves no temporary file either
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise disk_error(path, e) from None
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=4) + "\n"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


class Job:
    """A working directory and its ``job.json``.

    ``Job.prepare`` reads a job (or describes a new one) and decides how it resumes without writing
    anything, so checks that fail leave the directory as it was; ``start`` then writes.
    """

    def __init__(self, directory: Path, settings: Settings, state: dict[str, Any],
                 written_at: dict[str, str] | None = None):
        self.dir = directory
        self.settings = settings
        self.state = state
        #: The stage at which each state key was last written, so a rewind knows what is stale.
        self.written_at = {} if written_at is None else written_at
        self.changes: list[SettingChange] = []
        self.redo_from: str | None = None
        self.restart = False
        self.is_new = False
        #: Another rank's view of the job rank 0 writes: its state moves along, nothing is saved.
        self.read_only = False

    @classmethod
    def open(cls, directory: str | Path, settings: Settings, *, restart: bool = False) -> "Job":
        """Resume the job in ``directory`` or start a new one (``restart`` wipes the directory)."""
        job = cls.prepare(directory, settings, restart=restart)
        job.start()
        return job

    @classmethod
    def prepare(cls, directory: str | Path, settings: Settings, *, restart: bool = False) -> "Job":
        """The job ``open`` would start or resume, with ``changes`` and ``redo_from`` decided; no writes."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise Exl2Error(f"{directory} exists and is not a directory")
        job_path = directory / JOB_FILE
        if job_path.is_file() and not restart:
            try:
                saved = json.loads(job_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise Exl2Error(f"{job_path} is unreadable ({e}); rerun with -nr to start over") from None
            job = cls(directory, settings, saved["state"], saved.get("written_at"))
            job._plan_resume(type(settings).from_saved(saved["settings"]), has_origins="written_at" in saved)
            return job
        if (not restart and directory.exists()
                and any(p for p in directory.iterdir() if not p.name.startswith("."))):
            raise Exl2Error(f"{directory} is not empty and holds no job; choose an empty directory or -nr")
        job = cls(directory, settings, {"progress": "begin"})
        job.restart, job.is_new = restart, True
        return job

    def _plan_resume(self, old: Settings, has_origins: bool) -> None:
        """Accept settings changed since the job started when only stages after its measurement depend on
        them (those are redone from ``redo_from``); refuse the others."""
        self.changes = self.settings.changes_from(old)
        if not self.changes:
            return
        first = min((c.stage for c in self.changes), key=stage_index)
        redo_from = LOOP_START.get(first, first)
        if stage_index(redo_from) >= stage_index(self.progress):
            return  # nothing computed so far depends on them
        if stage_index(first) <= stage_index(MEASUREMENT_STAGE) or not has_origins:
            raise Exl2Error(self._refusal(first, old))
        self.redo_from = redo_from

    def _refusal(self, first: str, old: Settings) -> str:
        measuring = [c for c in self.changes if stage_index(c.stage) <= stage_index(MEASUREMENT_STAGE)]
        diff = "; ".join(str(c) for c in measuring or self.changes)
        measured = self.dir / "measurement.json"
        if not measured.is_file():
            measured = Path(old.measurement) if old.measurement and Path(old.measurement).is_file() else None
        if stage_index(first) > stage_index(MEASUREMENT_STAGE):
            why = "this job predates resuming with changed settings"
        else:
            why = "they change its measurement"
        reuse = (f", start a new job (another -o) that reuses the finished measurement with -m {measured}"
                 if measured is not None and stage_index(self.progress) > stage_index(MEASUREMENT_STAGE) else "")
        return (f"{self.dir} holds a job with other settings ({diff}); {why}: rerun with the job's values "
                f"to resume{reuse}, or -nr to start over")

    def resume_note(self) -> str:
        """The log line of a job resumed with changed settings."""
        changed = "; ".join(f"{c.name} {c.old!r} → {c.new!r}" for c in self.changes)
        if self.redo_from is None:
            return f"settings changed since the job started ({changed}); nothing done so far depends on them"
        return (f"settings changed since the job started ({changed}); keeping its measurement and redoing "
                f"the job from {self.redo_from}")

    def start(self) -> None:
        """Write what ``prepare`` decided: wipe (``-nr``), save a new job, or rewind to ``redo_from``."""
        if self.restart and self.dir.exists():
            for child in self.dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if self.redo_from is not None:
            self.rewind(self.redo_from)
        else:
            self.save()

    def rewind(self, stage: str) -> None:
        """Go back to ``stage``, forgetting every state key written at it or later; the caller removes
        the files those keys described."""
        for key, at in list(self.written_at.items()):
            if stage_index(at) >= stage_index(stage):
                self.state.pop(key, None)
                del self.written_at[key]
        self.state["progress"] = stage
        self.save()

    @property
    def progress(self) -> str:
        return self.state["progress"]

    def advance(self, stage: str, **updates: Any) -> None:
        """Move to ``stage`` (and record ``updates``, the work of the stage now finished) in one atomic save."""
        assert stage in STAGES, stage
        self._record(updates)
        self.state.update(updates, progress=stage)
        self.save()

    def update(self, **updates: Any) -> None:
        self._record(updates)
        self.state.update(updates)
        self.save()

    def _record(self, updates: dict[str, Any]) -> None:
        for key in updates:
            self.written_at[key] = self.progress

    def save(self) -> None:
        if self.read_only:
            return
        write_json(self.dir / JOB_FILE, {"settings": asdict(self.settings), "state": self.state,
                                         "written_at": self.written_at})

    def path(self, name: str) -> Path:
        return self.dir / name
