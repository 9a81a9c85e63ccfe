"""Helpers shared by the tests: tiny file systems, model copies, error lines, digests, interrupted stages,
correlated activations."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

CAL = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "--device", "cpu", "--checkpoint-interval", "0"]


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"exl2test-{uuid.uuid4().hex[:8]}",
                              str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def error_line(err: str) -> str:
    """The single ``error:`` line of a failed command (and that there is exactly one, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def job_state(work: Path) -> dict:
    return json.loads((work / "job.json").read_text())["state"]


def interrupt_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, calls: int) -> None:
    """Make ``module.name`` raise KeyboardInterrupt (Ctrl-C) on its call after ``calls`` real ones."""
    real, done = getattr(module, name), []

    def stop(*args, **kwargs):
        if len(done) == calls:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, stop)


def correlated_inputs(k: int, rows: int, seed: int) -> torch.Tensor:
    """Activations with correlated features and very unequal feature energies, like real LLM inputs."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    energy = torch.exp(torch.randn(k, generator=gen))
    return (torch.randn(rows, k, generator=gen) @ mix) * energy
