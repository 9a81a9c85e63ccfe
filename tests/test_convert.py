"""End-to-end conversion of a tiny Llama on the CPU: bitrates, measurement reuse, compile, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exl2core.cli import main
from exl2core.model.exl2_weights import open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import resolve_plan
from exl2core.quant.qparams import pad32

pytestmark = pytest.mark.slow

CAL = ["-mr", "3", "-ml", "64", "-r", "6", "-l", "64", "--device", "cpu"]


def exl2_logits(exl2_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a compiled EXL2 directory through exl2core's own loader."""
    return open_model(exl2_dir).logits(ids, dtype=torch.float32, device="cpu")


def kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p = torch.log_softmax(ref, -1)
    q = torch.log_softmax(test, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def decoder_bits(exl2_dir: Path, plan) -> tuple[int, int]:
    """Bits of all packed decoder tensors as stored on disk, and the parameter count they cover."""
    bits = numel = 0
    handles = [safe_open(str(p), "pt") for p in exl2_dir.glob("output*.safetensors")]
    for module in plan.modules:
        if not module.slots:
            continue
        for lin in module.linears:
            numel += lin.in_features * pad32(lin.out_features)
            for h in handles:
                for k in h.keys():
                    if k.startswith(lin.key + ".q_") or k == lin.key + ".bias":
                        t = h.get_tensor(k)
                        bits += t.numel() * t.element_size() * 8
    return bits, numel


@pytest.fixture(scope="module")
def measured(convert_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("measure")
    assert main(["convert", "-i", str(convert_model), "-o", str(work / "job"), "-om",
                 str(work / "m.json"), *CAL]) == 0
    return work / "m.json"


def test_measurement_schema(convert_model, measured):
    data = json.loads(measured.read_text())
    plan = resolve_plan(SourceModel(convert_model).config)
    m = data["measurement"]
    assert data["last_module_idx"] == len(plan.modules) - 1
    assert len(m["model.layers.0.self_attn"]) == 19 and len(m["model.layers.1.mlp"]) == 17
    assert m["model.norm.norm"] is None and m["lm_head.linear"] is None
    rec = m["model.layers.0.self_attn"][6]
    assert rec["q_proj"] == {"group_size": {"4": 128}, "bits": [4], "bits_prop": [1], "scale_bits": 4}
    acc = [r["accuracy"] for r in m["model.layers.0.mlp"]]
    assert acc[-1] > acc[0] and all(0 < a <= 1 for a in acc)


@pytest.mark.parametrize("bits", [2.5, 4.0, 6.0])
def test_convert_bitrates(convert_model, measured, tmp_path, bits, kl_by_bits):
    out = tmp_path / "model"
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path / "job"), "-m", str(measured),
                 "-b", str(bits), "-cf", str(out), *CAL]) == 0
    job = json.loads((tmp_path / "job" / "job.json").read_text())["state"]
    plan = resolve_plan(SourceModel(convert_model).config)
    bits_on_disk, numel = decoder_bits(out, plan)
    achieved = bits_on_disk / numel
    assert achieved == pytest.approx(job["optimization"]["bpw"], rel=1e-9)
    assert bits - 0.1 <= achieved <= bits
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "exl2", "version": "0.3.2", "bits": bits,
                                             "head_bits": 6, "calibration": {"rows": 6, "length": 64,
                                                                             "dataset": "(default)"}}
    assert (out / "tokenizer.json").is_file() and not list(out.glob("*.bin"))
    assert not (out / "model.safetensors").exists()
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = forward_logits(SourceModel(convert_model), plan, ids)
    kl_by_bits[bits] = kl(ref, exl2_logits(out, ids))
    assert job["calibration_perplexity"] < 1e4


@pytest.fixture(scope="module")
def kl_by_bits():
    return {}


def test_kl_falls_as_bits_rise(kl_by_bits):
    if len(kl_by_bits) < 3:
        pytest.skip("needs the three bitrate conversions")
    assert kl_by_bits[2.5] > kl_by_bits[4.0] > kl_by_bits[6.0]
    assert kl_by_bits[6.0] < 0.02


def test_sharding_and_plain_output(convert_model, measured, tmp_path):
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path), "-m", str(measured),
                 "-b", "4.0", "-ss", "0.25", *CAL]) == 0
    shards = sorted(tmp_path.glob("output-*.safetensors"))
    assert len(shards) > 1
    assert shards[0].name == f"output-00001-of-{len(shards):05d}.safetensors"
    keys = [k for s in shards for k in safe_open(str(s), "pt").keys()]
    assert len(keys) == len(set(keys)) and "lm_head.q_weight" in keys
    assert "model.embed_tokens.weight" in keys and "model.layers.1.mlp.down_proj.q_invperm" in keys
    source_cfg = json.loads((convert_model / "config.json").read_text())
    assert "quantization_config" not in source_cfg


def test_resume_with_settings_that_change_the_measurement_is_refused(convert_model, measured, tmp_path, capsys):
    """-b may change on resume (tests/test_resume_settings.py); the calibration seed feeds the measurement."""
    args = ["convert", "-i", str(convert_model), "-o", str(tmp_path), "-m", str(measured), "-b", "4.0", *CAL]
    assert main(args) == 0
    assert main([*args, "--seed", "1"]) == 1
    assert "other settings (seed: 0 (job) vs 1 (now))" in capsys.readouterr().err


def test_job_from_before_the_scale_search_setting_resumes_only_with_exllamav2s(convert_model, measured,
                                                                             tmp_path, capsys):
    """Older jobs quantized with exllamav2's scale search; resuming one must not mix in the other."""
    args = ["convert", "-i", str(convert_model), "-o", str(tmp_path), "-m", str(measured), "-b", "4.0", *CAL]
    assert main([*args, "--scale-search", "exllamav2"]) == 0
    job = json.loads((tmp_path / "job.json").read_text())
    del job["settings"]["scale_search"]
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(args) == 1
    assert "scale_search: 'exllamav2' (job) vs 'hessian' (now)" in capsys.readouterr().err
    assert main([*args, "--scale-search", "exllamav2"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["-hb", "7"], "head bits must be one of"),
    (["-b", "9.5"], "outside what the candidate tables reach"),
])
def test_bad_settings(convert_model, measured, tmp_path, capsys, extra, message):
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path), "-m", str(measured),
                 *CAL, *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]


def test_missing_model(tmp_path, capsys):
    assert main(["convert", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "w")]) == 1
    assert "no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_corrupt_shard(convert_model, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in convert_model.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert main(["convert", "-i", str(bad), "-o", str(tmp_path / "w"), *CAL]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err


def test_measurement_of_another_model(convert_model, tiny_llama, tmp_path, capsys, measured):
    other = json.loads(measured.read_text())
    key = "model.layers.0.self_attn"
    for r in other["measurement"][key]:
        r["total_bits"] += 4096
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    assert main(["convert", "-i", str(convert_model), "-o", str(tmp_path / "w"), "-m", str(path), *CAL]) == 1
    assert "does not match this model" in capsys.readouterr().err


def test_unwritable_output_is_a_clear_error_and_resumes(convert_model, measured, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output directory's parent should be")
    args = ["convert", "-i", str(convert_model), "-o", str(tmp_path / "job"), "-m", str(measured),
            "-cf", str(blocker / "model"), *CAL]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: the output directory {blocker / 'model'} cannot be created: "
                                    f"{blocker} is a file") and "Traceback" not in err
    assert not (tmp_path / "job").exists()  # found before any work
    blocker.unlink()
    blocker.mkdir()
    assert main(args) == 0
    assert (blocker / "model" / "output.safetensors").is_file()


def test_transformers5_config_gains_the_keys_exllamav2_reads():
    from exl2core.pipeline.compile import with_classic_keys

    section = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
               "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2}
    out = with_classic_keys(section)
    assert out["rope_theta"] == 1e6 and out["rope_local_base_freq"] == 1e4
    assert out["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert out["sliding_window_pattern"] == 6
    plain = with_classic_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_theta": 1})
    assert plain["rope_theta"] == 1 and "rope_scaling" not in plain
