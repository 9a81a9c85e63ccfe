"""A job killed with SIGKILL at any point resumes and produces byte-identical output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CAL = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "-b", "4.0", "--device", "cpu",
       "--checkpoint-interval", "0", "--status-json"]


def run(args: list[str], kill_at: tuple[str, float] | None = None) -> int:
    """Run ``exl2 convert``; with ``kill_at=(stage, completion)`` SIGKILL it once progress gets there."""
    cmd = [sys.executable, "-m", "exl2core.cli", "convert", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        event = json.loads(line)
        if kill_at and event.get("stage") == kill_at[0] and event.get("completion", 0) >= kill_at[1]:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return -9
    return proc.wait()


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


def test_job_killed_at_each_pass_resumes_byte_identical(convert_model, tmp_path):
    """One job is killed in the middle and at the end of measurement, in the middle and at the end of
    quantization, resumed after each kill, and must equal an uninterrupted run of the same command."""
    ref = ["-i", str(convert_model), "-o", str(tmp_path / "ref"), "-cf", str(tmp_path / "ref_out"), *CAL]
    assert run(ref) == 0
    args = ["-i", str(convert_model), "-o", str(tmp_path / "job"), "-cf", str(tmp_path / "out"), *CAL]
    seen = []
    for kill_at in [("Measuring", 0.3), ("Measuring", 0.97), ("Quantizing", 0.3), ("Quantizing", 0.8)]:
        assert run(args, kill_at) == -9, f"the job finished before {kill_at}"
        seen.append(json.loads((tmp_path / "job" / "job.json").read_text())["state"]["progress"])
    assert seen[0] == "measure" and seen[-1] == "quant"
    assert run(args) == 0
    assert digest(tmp_path / "out") == digest(tmp_path / "ref_out")
