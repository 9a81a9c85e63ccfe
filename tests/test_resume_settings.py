"""Resuming with changed settings: later-stage ones redo only what depends on them, the rest is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import field, make_dataclass
from pathlib import Path

import pytest

import exl2core.pipeline.convert as convert_module
from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.pipeline.job import Job, Settings

from failure_helpers import CAL, digest, error_line, interrupt_after, job_state

pytestmark = pytest.mark.slow

NEW = ["-b", "5.0", "-hb", "8", "-r", "5"]


def convert(model: Path, work: Path, out: Path, *extra: str) -> int:
    return main(["convert", "-i", str(model), "-o", str(work), "-cf", str(out), *CAL, *extra])


@pytest.fixture(scope="module")
def finished(convert_model, tmp_path_factory) -> Path:
    """A finished job at 4.0 bpw (its own measurement), to be copied by each test."""
    base = tmp_path_factory.mktemp("resume_settings")
    assert convert(convert_model, base / "job", base / "model", "-b", "4.0") == 0
    return base


@pytest.fixture(scope="module")
def fresh_new(convert_model, tmp_path_factory) -> Path:
    """The reference: a fresh job with the new settings from the start."""
    base = tmp_path_factory.mktemp("resume_fresh")
    assert convert(convert_model, base / "job", base / "model", *NEW) == 0
    return base / "model"


def copy_job(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "job", tmp_path / "job")
    return tmp_path / "job"


def test_new_bits_after_a_finished_job_redo_only_from_optimize(convert_model, finished, fresh_new, tmp_path,
                                                               capsys):
    work = copy_job(finished, tmp_path)
    measurement = (work / "measurement.json").read_bytes()
    capsys.readouterr()
    assert convert(convert_model, work, tmp_path / "model", *NEW) == 0
    err = " ".join(capsys.readouterr().err.split())  # the log wraps lines at the console's width
    assert (f"settings changed since the job started (bits 4.0 → 5.0; head_bits 6 → 8; rows 4 → 5; compile_full "
            f"'{finished / 'model'}' → '{tmp_path / 'model'}'); keeping its measurement and redoing the job from "
            "optimize") in err
    assert "Measuring" not in err
    assert (work / "measurement.json").read_bytes() == measurement
    assert digest(tmp_path / "model") == digest(fresh_new)
    state = job_state(work)
    assert state["optimization"]["target_bpw"] == 5.0 and 4.5 < state["optimization"]["bpw"] <= 5.0


def test_new_bits_in_the_middle_of_quantization_discard_its_stale_work(convert_model, finished, fresh_new,
                                                                       tmp_path, monkeypatch):
    """A job stopped after two quantized modules (checkpoint, packed tensors on disk) and resumed with other
    bits, head bits and rows gives the same model as a fresh job with those settings."""
    shutil.copytree(finished / "job", tmp_path / "job", ignore=shutil.ignore_patterns("out_tensor"))
    work = tmp_path / "job"
    job = json.loads((work / "job.json").read_text())
    job["state"].update(progress="optimize")
    (work / "job.json").write_text(json.dumps(job))
    interrupt_after(monkeypatch, convert_module, "quantize_module", 2)
    assert convert(convert_model, work, tmp_path / "model", "-b", "4.0") == 130
    monkeypatch.undo()
    state = job_state(work)
    assert state["progress"] == "quant" and state["q_last_module_idx"] == 2
    assert state["hidden_states"] and (work / state["hidden_states"]).is_file()
    assert len(list((work / "out_tensor").glob("*.safetensors"))) == 7  # layer 0's linears
    assert convert(convert_model, work, tmp_path / "model", *NEW) == 0
    assert digest(tmp_path / "model") == digest(fresh_new)
    assert not list(work.glob("hidden_states.*"))


def test_a_resumed_compilation_removes_what_killed_writes_left(convert_model, finished, tmp_path):
    """SIGKILL mid-write leaves atomic_write's temporary files (and a checkpoint the job never pointed
    at); resuming removes exactly those, in the job and the output directory, and gives the same model."""
    work = copy_job(finished, tmp_path)
    shutil.copytree(finished / "model", tmp_path / "model")
    job = json.loads((work / "job.json").read_text())
    job["state"].update(progress="compile")
    (work / "job.json").write_text(json.dumps(job))
    left = [work / ".job.json.k2x_9q0a.tmp", work / "out_tensor" / ".layers.0.up_proj.safetensors.a1b2c3d4.tmp",
            work / "hidden_states.quant.0003.safetensors", tmp_path / "model" / ".config.json.zw1ba0h6.tmp"]
    draft = tmp_path / "model" / ".draft.tmp"
    kept = [work / "notes.tmp", draft]  # not names atomic_write makes
    for path in left + kept:
        path.write_bytes(b"partial")
    (tmp_path / "model" / "output.safetensors").unlink()  # the kill came before the shard was renamed
    assert convert(convert_model, work, tmp_path / "model", "-b", "4.0") == 0
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)
    draft.unlink()
    assert digest(tmp_path / "model") == digest(finished / "model")


def test_settings_that_change_the_measurement_are_refused_naming_the_reuse_path(convert_model, finished,
                                                                                 tmp_path, capsys):
    work = copy_job(finished, tmp_path)
    before = digest(work)
    assert convert(convert_model, work, tmp_path / "model", "-b", "4.0", "-mr", "3") == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: {work} holds a job with other settings (measurement_rows: 2 (job) vs 3 (now)); they change its "
        f"measurement: rerun with the job's values to resume, start a new job (another -o) that reuses the "
        f"finished measurement with -m {work / 'measurement.json'}, or -nr to start over")
    assert digest(work) == before
    assert convert(convert_model, tmp_path / "reuse", tmp_path / "model", "-b", "5.0",
                   "-m", str(work / "measurement.json")) == 0


def saved_job(tmp_path: Path, settings: Settings, progress: str, written_at: dict | None = None) -> Path:
    work = tmp_path / "job"
    work.mkdir()
    saved = {k: v for k, v in vars(settings).items() if k != "extra"}
    job = {"settings": saved, "state": {"progress": progress, "strategy": {}, "module_errors": {}},
           "written_at": written_at if written_at is not None else {"strategy": "optimize",
                                                                    "module_errors": "quant"}}
    (work / "job.json").write_text(json.dumps(job))
    return work


def test_a_field_added_later_is_handled_by_its_stage_metadata(tmp_path):
    """Other fields carry only ``metadata["stage"]`` (and ``legacy``): an old job.json without the field
    takes the legacy value, and a change redoes the job from that stage's loop."""
    Extended = make_dataclass("Extended", [("extra", int, field(default=1, metadata={"stage": "quant",
                                                                                      "legacy": 0}))],
                              bases=(Settings,))
    work = saved_job(tmp_path, Extended(in_dir="m"), "finished")
    job = Job.prepare(work, Extended(in_dir="m", extra=1))
    assert [(c.name, c.old, c.new, c.stage) for c in job.changes] == [("extra", 0, 1, "quant")]
    assert job.redo_from == "quant_embeddings"
    job.start()
    state = job_state(work)
    assert state == {"progress": "quant_embeddings", "strategy": {}}


def test_a_field_without_stage_metadata_is_never_changed_on_resume(tmp_path):
    Bare = make_dataclass("Bare", [("extra", int, field(default=1))], bases=(Settings,))
    work = saved_job(tmp_path, Bare(in_dir="m"), "quant")
    assert Job.prepare(work, Bare(in_dir="m")).changes == []  # absent from the old job.json: its default
    with pytest.raises(Exl2Error, match=r"other settings \(extra: 1 \(job\) vs 2 \(now\)\)"):
        Job.prepare(work, Bare(in_dir="m", extra=2))


def test_a_job_from_before_stage_records_is_not_rewound(tmp_path):
    work = saved_job(tmp_path, Settings(in_dir="m"), "compile", written_at={})
    job = json.loads((work / "job.json").read_text())
    del job["written_at"]
    (work / "job.json").write_text(json.dumps(job))
    with pytest.raises(Exl2Error, match="this job predates resuming with changed settings"):
        Job.prepare(work, Settings(in_dir="m", bits=5.0))


def test_a_measure_only_job_goes_on_to_the_model(convert_model, finished, tmp_path, capsys):
    """`-om` first, then the same job without it: the measurement is kept and the model equals a fresh job's."""
    work = tmp_path / "job"
    assert main(["convert", "-i", str(convert_model), "-o", str(work), "-om", str(tmp_path / "m.json"), *CAL]) == 0
    state = job_state(work)
    assert state["progress"] == "finished" and "strategy" not in state
    assert (tmp_path / "m.json").read_bytes() == (work / "measurement.json").read_bytes()
    capsys.readouterr()
    assert convert(convert_model, work, tmp_path / "model", "-b", "4.0") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "keeping its measurement and redoing the job from optimize" in err and "Measuring" not in err
    assert digest(tmp_path / "model") == digest(finished / "model")


def test_a_job_stuck_at_an_unreachable_target_takes_a_valid_one(tmp_path):
    """The issue's stuck job (measured, then refused at optimize for -b 1.0, by a version without stage
    records) resumes with another -b: nothing computed depends on it, so nothing is redone."""
    work = saved_job(tmp_path, Settings(in_dir="m", bits=1.0), "optimize")
    job = json.loads((work / "job.json").read_text())
    del job["written_at"]
    (work / "job.json").write_text(json.dumps(job))
    resumed = Job.prepare(work, Settings(in_dir="m", bits=4.0))
    assert [str(c) for c in resumed.changes] == ["bits: 1.0 (job) vs 4.0 (now)"] and resumed.redo_from is None
    resumed.start()
    saved = json.loads((work / "job.json").read_text())
    assert saved["settings"]["bits"] == 4.0 and saved["state"]["progress"] == "optimize"
    assert resumed.resume_note() == ("settings changed since the job started (bits 1.0 → 4.0); nothing done so "
                                     "far depends on them")
