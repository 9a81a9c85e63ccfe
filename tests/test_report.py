"""The conversion report PNG and the model card a user looks at."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from exl2core import __version__
from exl2core.cli import main
from exl2core.model.source import SourceModel
from exl2core.pipeline.model_card import SOURCE_CARD_FILE, CardFacts, render_card
from exl2core.pipeline.preflight import slot_keys, slot_numel
from exl2core.pipeline.report import METADATA_KEY
from exl2core.plugins import resolve_plan

from failure_helpers import CAL, error_line, job_state

pytestmark = pytest.mark.slow

SOURCE_README = """---
license: apache-2.0
language:
- en
tags:
- llama
- tiny
---

# Tiny Llama

A test model. Its card must survive conversion.
"""


@pytest.fixture(scope="module")
def converted(convert_model, tmp_path_factory) -> Path:
    """A finished conversion of a source that ships its own README.md."""
    base = tmp_path_factory.mktemp("report")
    model = base / "tiny-llama"
    shutil.copytree(convert_model, model)
    (model / "README.md").write_text(SOURCE_README)
    assert main(["convert", "-i", str(model), "-o", str(base / "job"), "-cf", str(base / "out"), "-b", "4.0",
                 *CAL]) == 0
    return base


def png_data(path: Path) -> dict:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 600
        data = json.loads(image.text[METADATA_KEY])
    with Image.open(path) as image:
        image.verify()
    return data


def bits_on_disk(out: Path, model: Path) -> dict[str, float]:
    """Bits per weight of each slot as stored in the compiled shards (packed tensors and biases)."""
    plan = resolve_plan(SourceModel(model).config)
    (shard,) = out.glob("output*.safetensors")
    result = {}
    with safe_open(str(shard), "pt") as f:
        keys = list(f.keys())
        for module, slot, _ in slot_keys(plan):
            bits = 0
            for lin in module.linears:
                if lin.role not in slot.roles:
                    continue
                for k in keys:
                    if k.startswith(lin.key + ".q_") or k == lin.key + ".bias":
                        t = f.get_slice(k)
                        bits += math.prod(t.get_shape()) * {"I32": 32, "I16": 16, "F16": 16}[t.get_dtype()]
            result[slot.key] = bits / slot_numel(module, slot)
    return result


def test_report_png_shows_the_bits_the_model_holds(converted):
    data = png_data(converted / "job" / "report.png")
    on_disk = bits_on_disk(converted / "out", converted / "tiny-llama")
    assert data["bits"].keys() == on_disk.keys() and len(on_disk) == 4
    for key, bpw in on_disk.items():
        assert data["bits"][key] == pytest.approx(bpw, rel=1e-12)
    state = job_state(converted / "job")
    assert data["achieved_bpw"] == state["optimization"]["bpw"]
    assert data["calibration_perplexity"] == state["calibration_perplexity"]
    measurement = json.loads((converted / "job" / "measurement.json").read_text())["measurement"]
    for s in data["slots"]:
        numel = state["strategy"][s["key"]]["total_bits"] / s["chosen"]["bpw"]
        measured = {(r["total_bits"], 1 - r["accuracy"]) for r in measurement[s["key"]]}
        for name in ("chosen", "cheaper", "dearer"):
            c = s[name]
            assert c is not None and (round(c["bpw"] * numel), c["error"]) in measured
        assert s["cheaper"]["bpw"] <= s["chosen"]["bpw"] <= s["dearer"]["bpw"]
    assert (converted / "out" / "exl2_report.png").read_bytes() == (converted / "job" / "report.png").read_bytes()


def test_report_command_rewrites_the_same_picture(converted, tmp_path, capsys):
    out = tmp_path / "again.png"
    assert main(["report", str(converted / "job"), "-o", str(out)]) == 0
    assert out.read_bytes() == (converted / "job" / "report.png").read_bytes()
    assert capsys.readouterr().out.strip() == f"report written to {out}"


def test_report_of_a_job_without_allocation_is_one_line(convert_model, tmp_path, capsys):
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path / "job"), "-om",
                 str(tmp_path / "m.json"), *CAL]) == 0
    assert main(["report", str(tmp_path / "job")]) == 1
    assert error_line(capsys.readouterr().err) == ("error: the job has no bit allocation yet (progress: finished); "
                                                   "the report needs a job past its optimization stage")
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "holds no conversion job" in error_line(capsys.readouterr().err)


def test_model_card_follows_hugging_face_conventions_and_keeps_the_source_card(converted):
    out = converted / "out"
    card = (out / "README.md").read_text()
    assert (out / SOURCE_CARD_FILE).read_text() == SOURCE_README
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front.splitlines()[:7] == ["base_model: tiny-llama", "base_model_relation: quantized", "tags:",
                                      "- exl2", "- quantized", "- exl2core", "- llama"]
    assert "license: apache-2.0" in front and "language:\n- en" in front and "- tiny" in front
    state = job_state(converted / "job")
    assert f"| achieved bits per weight (decoder) | {state['optimization']['bpw']:.4f} |" in body
    assert "| target bits per weight | 4 |" in body and "| head bits | 6 |" in body
    assert "| calibration data | (default) |" in body and "| calibration rows (quantization) | 4 × 64 tokens |" in body
    assert f"exl2core {__version__}" in body and "ExLlamaV2Config(" in body and "](exl2_report.png)" in body
    original = body.split("## Original model card", 1)[1]
    assert "# Tiny Llama\n\nA test model. Its card must survive conversion." in original
    assert "license: apache-2.0" not in original  # the source's front matter moved into ours


def facts(**overrides) -> CardFacts:
    base = dict(base_model="org/model", target_bpw=4.0, achieved_bpw=3.98, head_bits=6, calibration_data="x",
                rows=4, length=64, measurement="2 × 64 tokens", calibration_perplexity=None, has_report_image=False)
    return CardFacts(**{**base, **overrides})


def test_card_without_a_source_card_and_with_inline_tags():
    card = render_card(facts(), None)
    assert card.startswith("---\nbase_model: org/model\n") and "Original model card" not in card
    assert "| calibration perplexity | n/a |" in card and "exl2_report.png" not in card
    inline = render_card(facts(), "---\ntags: [llama, exl2]\nlicense: mit\n---\nBody\n")
    front = inline.split("---\n")[1]
    assert front.count("- exl2\n") == 1 and "- llama\n" in front and "license: mit" in front
    assert inline.rstrip().endswith("Body")
