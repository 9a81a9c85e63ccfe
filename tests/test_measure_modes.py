"""``--measure fast|exact`` end to end on a tiny Llama: files, reuse with ``-m``, resume rules."""

from __future__ import annotations

import json

import pytest

from exl2core.cli import main

pytestmark = pytest.mark.slow

CAL = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def fast_measurement(convert_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("fast")
    assert main(["convert", "-i", str(convert_model), "-o", str(work / "job"), "--measure", "fast",
                 "-om", str(work / "m.json"), *CAL]) == 0
    return work


def test_fast_measurement_file_is_exllamav2s_schema_with_the_predicted_kl_beside(fast_measurement):
    saved = json.loads((fast_measurement / "m.json").read_text())
    assert set(saved) == {"measurement", "last_module_idx", "predicted_kl"}
    slots = {k: v for k, v in saved["measurement"].items() if v is not None}
    assert set(saved["predicted_kl"]) == set(slots) and len(slots) == 4
    for key, records in slots.items():
        kl = saved["predicted_kl"][key]
        assert len(kl) == len(records)
        assert all(0 < r["accuracy"] < 1 and r["total_bits"] > 0 for r in records)
        assert all(k >= 0 for k in kl) and kl[0] > kl[-1]  # the table's first row is its cheapest
    job = json.loads((fast_measurement / "job" / "job.json").read_text())
    assert job["settings"]["measure"] == "fast" and job["state"]["sensitivity"] == "sensitivity.safetensors"


def test_reused_fast_measurement_allocates_by_predicted_kl(convert_model, fast_measurement, tmp_path):
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path / "job"), "-m",
                 str(fast_measurement / "m.json"), "-b", "3.0", *CAL]) == 0
    summary = json.loads((tmp_path / "job" / "job.json").read_text())["state"]["optimization"]
    assert summary["bpw"] <= 3.0 and summary["objective"] == "lin"
    predicted = json.loads((fast_measurement / "m.json").read_text())["predicted_kl"]
    strategy = json.loads((tmp_path / "job" / "job.json").read_text())["state"]["strategy"]
    measurement = json.loads((fast_measurement / "m.json").read_text())["measurement"]
    chosen = sum(predicted[key][measurement[key].index(record)] for key, record in strategy.items())
    assert summary["predicted_kl"] == pytest.approx(chosen)


def test_measurement_without_predicted_kl_allocates_by_error(convert_model, fast_measurement, tmp_path):
    """An exllamav2 measurement.json (no predicted_kl) is still accepted: Σ err² as before."""
    saved = json.loads((fast_measurement / "m.json").read_text())
    del saved["predicted_kl"]
    (tmp_path / "exl2.json").write_text(json.dumps(saved))
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path / "job"), "-m", str(tmp_path / "exl2.json"),
                 "-b", "3.0", *CAL]) == 0
    summary = json.loads((tmp_path / "job" / "job.json").read_text())["state"]["optimization"]
    assert summary["objective"] == "sq" and "predicted_kl" not in summary


def test_resume_with_another_mode_is_refused(convert_model, fast_measurement, capsys):
    rc = main(["convert", "-i", str(convert_model), "-o", str(fast_measurement / "job"), "--measure", "exact",
               "-om", str(fast_measurement / "m.json"), *CAL])
    err = capsys.readouterr().err
    assert rc != 0 and "measure: 'fast' (job) vs 'exact' (now)" in err


def test_unknown_mode_is_one_line(convert_model, tmp_path, capsys):
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path / "job"), "--measure", "quick", *CAL]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "measurement mode must be one of exact, hessian, fast" in err
    assert not (tmp_path / "job").exists()
