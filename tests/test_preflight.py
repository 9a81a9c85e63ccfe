"""Pre-flight checks: a job that cannot succeed fails before any token is embedded, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exl2core.cli import main
from exl2core.model.source import SourceModel
from exl2core.pipeline import preflight
from exl2core.pipeline.job import Job, Settings
from exl2core.pipeline.optimize import bpw_range, measured_slots, options_of
from exl2core.pipeline.records import by_slot
from exl2core.plugins import resolve_plan

from failure_helpers import CAL, error_line, tmpfs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def measured(convert_model, tmp_path_factory) -> Path:
    """A finished measure-only job of the conversion test model (its measurement.json)."""
    work = tmp_path_factory.mktemp("preflight_measure")
    assert main(["convert", "-i", str(convert_model), "-o", str(work / "job"), "-om", str(work / "m.json"),
                 *CAL]) == 0
    return work / "m.json"


def convert(model: Path, work: Path, *extra: str) -> int:
    return main(["convert", "-i", str(model), "-o", str(work), *CAL, *extra])


def test_bpw_range_from_shapes_equals_the_measured_records(convert_model, measured):
    """The range is known from the shapes and tables alone: it equals the range of a real measurement."""
    plan = resolve_plan(SourceModel(convert_model).config)
    from_shapes = preflight.attainable_bpw(plan)
    records = json.loads(measured.read_text())["measurement"]
    keys = [k for _, _, k in preflight.slot_keys(plan)]
    lo, hi = bpw_range([options_of(r) for r in measured_slots(records, keys)], plan.blocks_numel())
    assert (from_shapes.low, from_shapes.high) == (lo, hi)
    assert 2.0 < lo < 3.0 and 7.5 < hi < 8.5


@pytest.mark.parametrize("bits", ["1.0", "9"])
def test_target_outside_the_tables_fails_before_any_work(convert_model, tmp_path, capsys, bits):
    plan = resolve_plan(SourceModel(convert_model).config)
    reach = preflight.attainable_bpw(plan)
    assert convert(convert_model, tmp_path / "job", "-b", bits) == 1
    line = error_line(capsys.readouterr().err)
    assert line == (f"error: target {float(bits)} bpw is outside what the candidate tables reach for this model "
                    f"({reach.low:.3f}–{reach.high:.3f} bpw); choose -b in that range")
    assert not (tmp_path / "job").exists()


def test_target_checked_against_the_records_of_a_measurement_file(convert_model, measured, tmp_path, capsys):
    """With -m the file's records bound the range: records made dearer raise the low end."""
    data = json.loads(measured.read_text())
    for records in by_slot(data["measurement"]).values():
        for r in records:
            r["total_bits"] = int(r["total_bits"] * 1.5) if r is not records[0] else r["total_bits"]
    dear = tmp_path / "dear.json"
    dear.write_text(json.dumps(data))
    plan = resolve_plan(SourceModel(convert_model).config)
    hi = preflight.attainable_bpw(plan, data["measurement"]).high
    assert hi > preflight.attainable_bpw(plan).high + 1  # the file, not the tables, bounds the target
    assert convert(convert_model, tmp_path / "job", "-m", str(dear), "-b", str(round(hi + 0.5, 1))) == 1
    assert "outside what the candidate tables reach" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "job").exists()


def test_parquet_without_a_text_column_is_an_error(convert_model, tmp_path, capsys):
    data = tmp_path / "cal.parquet"
    pq.write_table(pa.table({"content": ["w3 w4 w5"] * 10, "id": list(range(10))}), data)
    assert convert(convert_model, tmp_path / "job", "-c", str(data)) == 1
    assert error_line(capsys.readouterr().err) == ("error: calibration dataset cal.parquet has no 'text' column "
                                                   "(its columns: content, id); name the column of calibration "
                                                   "text 'text'")
    assert not (tmp_path / "job").exists()


def test_parquet_too_short_names_the_shortfall(convert_model, tmp_path, capsys):
    data = tmp_path / "short.parquet"
    pq.write_table(pa.table({"text": ["The quick brown fox jumps over the lazy dog."] * 3}), data)
    tokens = sum(len(SourceModel(convert_model).tokenizer.encode(t, add_special_tokens=False).ids)
                 for t in ["The quick brown fox jumps over the lazy dog."] * 3)
    assert convert(convert_model, tmp_path / "job", "-c", str(data)) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: calibration dataset short.parquet holds {tokens} tokens, but 2 rows of 64 need 128 "
        "(measurement rows -mr/-ml: 2 × 64)")
    assert not (tmp_path / "job").exists()


def test_read_only_output_and_work_directories(convert_model, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert convert(convert_model, tmp_path / "job", "-cf", str(ro / "model")) == 1
        assert error_line(capsys.readouterr().err) == (
            f"error: the output directory {ro / 'model'} is not writable (read-only file system at {ro}); "
            "choose another directory or fix its permissions")
        assert not (tmp_path / "job").exists()
        assert convert(convert_model, ro / "job") == 1
        assert error_line(capsys.readouterr().err).startswith(f"error: the work directory {ro / 'job'} is not "
                                                              "writable (read-only file system")


def test_too_little_space_for_the_output_is_refused_up_front(convert_model, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "256k") as small:
        assert convert(convert_model, tmp_path / "job", "-cf", str(small / "model")) == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"error: not enough free space for {small / 'model'}: the job will write about ")
        assert "(the compiled model " in line and "but its file system has 0.2 MiB free" in line
        assert not (tmp_path / "job").exists()


def test_write_estimate_matches_what_a_job_writes(convert_model, measured, tmp_path):
    """The estimate of the compiled model and the packed tensors is within 15 % of the files written."""
    settings = Settings(in_dir=str(convert_model), bits=4.0, measurement=str(measured), rows=4, length=64,
                        measurement_rows=2, measurement_length=64, compile_full=str(tmp_path / "model"))
    source = SourceModel(convert_model)
    plan = resolve_plan(source.config)
    job = Job.prepare(tmp_path / "job", settings)
    writes = {w.what: w.nbytes for w in preflight.estimate_writes(settings, source, plan, job,
                                                                  preflight.stages_to_run(settings, "begin"), 4)}
    assert convert(convert_model, tmp_path / "job", "-m", str(measured), "-b", "4.0",
                   "-cf", str(tmp_path / "model")) == 0
    model = sum(p.stat().st_size for p in (tmp_path / "model").glob("output*.safetensors"))
    packed = sum(p.stat().st_size for p in (tmp_path / "job" / "out_tensor").glob("*.safetensors"))
    assert 0.85 < model / writes["the compiled model"] < 1.15
    assert 0.85 < packed / writes["packed tensors"] < 1.15
    tokens = (tmp_path / "job" / "cal_data.safetensors").stat().st_size
    assert 0.9 < tokens / writes["token ids"] < 1.1
