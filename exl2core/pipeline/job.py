"""Job state: everything about a conversion lives in its working directory.

``job.json`` holds the settings and the progress; large state (token ids, hidden states, packed
tensors) lives beside it. Every write is atomic (temp file, fsync, rename), so a job killed at any
moment resumes from its last checkpoint and reproduces an uninterrupted run byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from exl2core.errors import Exl2Error
from exl2core.pipeline.calibration_mix import DEFAULT_MIX, LEGACY_MIX

JOB_FILE = "job.json"
STAGES = ("begin", "measure_tokens", "measure_embeddings", "measure", "optimize", "quant_tokens",
          "quant_embeddings", "quant", "compile", "finished")


@dataclass
class Settings:
    """The user's choices that define a job's result; resuming with other values is refused."""

    in_dir: str
    cal_dataset: str | None = None
    bits: float = 4.125
    head_bits: int = 6
    rows: int = 100
    length: int = 2048
    measurement_rows: int = 16
    measurement_length: int = 2048
    shard_size: float = 8192
    compile_full: str | None = None
    rope_scale: float | None = None
    rope_alpha: float | None = None
    output_measurement: str | None = None
    measurement: str | None = None
    arch: str | None = None
    seed: int = 0
    scale_search: str = "hessian"
    # How the quantization pass fits each linear and lays out its groups (pipeline.quantize).
    fit: str = field(default="local", metadata={"stage": "quant"})
    layout: str = field(default="table", metadata={"stage": "quant"})
    # Version of the built-in calibration mix (pipeline.calibration_mix.MIXES); the first stage it affects.
    cal_mix: str = field(default=DEFAULT_MIX, metadata={"stage": "measure_tokens"})
    # ``measure.MEASURE_MODES``; jobs from before the option measured exactly.
    measure: str = field(default="exact", metadata={"stage": "measure"})

    def differences(self, other: "Settings") -> list[str]:
        return [f"{f.name}: {getattr(other, f.name)!r} (job) vs {getattr(self, f.name)!r} (now)"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


_UMASK = os.umask(0)
os.umask(_UMASK)


def _disk_error(path: Path, e: OSError) -> Exl2Error:
    reason = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, str(e))
    return Exl2Error(f"cannot write {path}: {reason}; work already checkpointed is kept, "
                     "free space or fix permissions and rerun the same command to resume")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` and rename it into place, durably."""
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
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise _disk_error(path, e) from None


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=4) + "\n"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p)))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


class Job:
    """A working directory and its ``job.json``."""

    def __init__(self, directory: Path, settings: Settings, state: dict[str, Any]):
        self.dir = directory
        self.settings = settings
        self.state = state

    @classmethod
    def open(cls, directory: str | Path, settings: Settings, *, restart: bool = False) -> "Job":
        """Resume the job in ``directory`` or start a new one (``restart`` wipes the directory)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise Exl2Error(f"{directory} exists and is not a directory")
        job_path = directory / JOB_FILE
        if restart and directory.exists():
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if job_path.is_file():
            try:
                saved = json.loads(job_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise Exl2Error(f"{job_path} is unreadable ({e}); rerun with -nr to start over") from None
            # Jobs from before the scale-search setting quantized with exllamav2's search, and jobs from
            # before the mix setting calibrated with mix v1.
            old = Settings(**{"scale_search": "exllamav2", "cal_mix": LEGACY_MIX, "measure": "exact",
                                **saved["settings"]})
            diff = settings.differences(old)
            if diff:
                raise Exl2Error(f"{directory} holds a job with other settings ({'; '.join(diff)}); "
                                "rerun with the same options to resume, or -nr to start over")
            return cls(directory, old, saved["state"])
        if directory.exists() and any(p for p in directory.iterdir() if not p.name.startswith(".")):
            if not restart:
                raise Exl2Error(f"{directory} is not empty and holds no job; choose an empty directory or -nr")
        job = cls(directory, settings, {"progress": "begin"})
        job.save()
        return job

    @property
    def progress(self) -> str:
        return self.state["progress"]

    def advance(self, stage: str, **updates: Any) -> None:
        """Move to ``stage`` (and record ``updates``) in one atomic save."""
        assert stage in STAGES, stage
        self.state.update(updates, progress=stage)
        self.save()

    def update(self, **updates: Any) -> None:
        self.state.update(updates)
        self.save()

    def save(self) -> None:
        write_json(self.dir / JOB_FILE, {"settings": asdict(self.settings), "state": self.state})

    def path(self, name: str) -> Path:
        return self.dir / name
