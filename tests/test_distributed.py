"""One job on several torch.distributed ranks (gloo, CPU), launched as torchrun would: the same bytes as one
rank, a killed rank stops the others within the collective timeout, any rank count resumes, and ranks that
disagree on the job fail in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from output_bytes import CASES, make_source
from test_resume import digest

pytestmark = pytest.mark.slow

CAL = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "-b", "4.0", "--device", "cpu", "--status-json"]
#: Seconds a collective waits for a silent peer in these tests (a dead one is noticed at once).
TIMEOUT = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, per_rank: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """``exl2 convert args`` on ``world`` ranks with torchrun's environment, one thread each (this machine
    has two cores); rank ``r`` gets ``per_rank[r]`` in place of ``args`` where given."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "EXL2_DIST_TIMEOUT": str(TIMEOUT)}
        cmd = [sys.executable, "-m", "exl2core.cli", "convert", *(per_rank or {}).get(rank, args)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """Each rank's exit code and stderr; no rank may hang."""
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a rank hung past {timeout} s")
        out.append((proc.returncode, err))
    return out


def until(proc: subprocess.Popen, stage: str, completion: float) -> None:
    """Read rank 0's progress lines until ``stage`` reaches ``completion``."""
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("stage") == stage and event.get("completion", 0) >= completion:
            return
    pytest.fail(f"the job ended before {stage} {completion}")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed_src")
    return {name: make_source(root, *CASES[name][:2]) for name in ("llama", "mixtral")}


@pytest.fixture(scope="module")
def one_rank(sources, tmp_path_factory) -> dict[str, dict[str, str]]:
    """The output files of each model converted on one rank, by digest."""
    out = {}
    for name, src in sources.items():
        work = tmp_path_factory.mktemp(f"one_{name}")
        ((code, err),) = finish(launch(["-i", str(src), "-o", str(work / "job"), "-cf", str(work / "out"), *CAL], 1))
        assert code == 0, err
        out[name] = digest(work / "out")
    return out


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_two_ranks_write_the_bytes_of_one(name, sources, one_rank, tmp_path):
    results = finish(launch(["-i", str(sources[name]), "-o", str(tmp_path / "job"), "-cf", str(tmp_path / "out"),
                             *CAL], 2))
    assert [code for code, _ in results] == [0, 0], results
    assert digest(tmp_path / "out") == one_rank[name]
    assert not errors(results[1][1])


def test_a_killed_rank_stops_the_job_and_any_rank_count_resumes(sources, one_rank, tmp_path):
    args = ["-i", str(sources["llama"]), "-o", str(tmp_path / "job"), "-cf", str(tmp_path / "out"), *CAL,
            "--checkpoint-interval", "0"]
    procs = launch(args, 2)
    until(procs[0], "Measuring", 0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    (code, err), _ = finish(procs, timeout=TIMEOUT + 30)
    assert time.monotonic() - killed < TIMEOUT + 30
    assert code == 1 and errors(err) == [e for e in errors(err) if "rank 0 stopped" in e] and len(errors(err)) == 1
    assert "rerun the same command" in err and "Traceback" not in err
    assert json.loads((tmp_path / "job" / "job.json").read_text())["state"]["progress"] == "measure"

    procs = launch(args, 1)  # resumed on one rank, killed in its quantization pass
    until(procs[0], "Quantizing", 0.5)
    procs[0].send_signal(signal.SIGKILL)
    finish(procs)
    assert json.loads((tmp_path / "job" / "job.json").read_text())["state"]["progress"] == "quant"

    results = finish(launch(args, 2))  # and finished on two
    assert [code for code, _ in results] == [0, 0], results
    assert digest(tmp_path / "out") == one_rank["llama"]


def test_ranks_that_disagree_fail_in_one_line(sources, tmp_path):
    args = ["-i", str(sources["llama"]), "-o", str(tmp_path / "job"), *CAL]
    other_bits = [*args[:-len(CAL)], *CAL[:CAL.index("-b")], "-b", "3.9", *CAL[CAL.index("-b") + 2:]]
    other_dir = ["-i", str(sources["llama"]), "-o", str(tmp_path / "elsewhere"), *CAL]
    for rank1, expected in [(other_bits, "rank 1 was started with other settings than rank 0 (bits: 4.0 vs 3.9)"),
                            (other_dir, "rank 1: cannot see the job directory")]:
        (code0, err0), (code1, err1) = finish(launch(args, 2, {1: rank1}))
        assert (code0, code1) == (1, 1)
        assert len(errors(err0)) == 1 and expected in errors(err0)[0], err0
        assert not errors(err1) and "Traceback" not in err0 + err1
