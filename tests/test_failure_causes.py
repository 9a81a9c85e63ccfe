"""The real cause, named: damaged source tensors, overflowing activations, and failed writes (disk full,
permission) during checkpoints and compilation, each one line, with nothing already computed lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import exl2core.pipeline.convert as convert_module
import exl2core.pipeline.job as job_module
from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.pipeline import preflight
from exl2core.plugins import resolve_plan

from failure_helpers import CAL, error_line, interrupt_after, job_state, tmpfs

pytestmark = pytest.mark.slow


def convert(model: Path, work: Path, *extra: str) -> int:
    return main(["convert", "-i", str(model), "-o", str(work), "-b", "4.0", *CAL, *extra])


def edited_model(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose single safetensors file went through ``edit(tensors)``."""
    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


def module_index(model: Path, key: str) -> int:
    plan = resolve_plan(SourceModel(model).config)
    return next(i for i, m in enumerate(plan.modules) if m.measurement_key == key)


def test_nan_in_a_source_weight_is_named_and_the_fixed_model_resumes(convert_model, tmp_path, capsys):
    def poison(t):
        w = t["model.layers.1.mlp.up_proj.weight"]
        w[3, 5] = float("nan")
        w[7, 1] = float("inf")

    model = edited_model(convert_model, tmp_path / "model", poison)
    work = tmp_path / "job"
    # Exact measurement, whose module loop reaches the damaged block (fast's sensitivity pass reads every
    # weight before the loop starts).
    assert convert(model, work, "--measure", "exact") == 1
    (shard,) = model.glob("*.safetensors")
    assert error_line(capsys.readouterr().err) == (
        f"error: {shard.name}: source tensor 'model.layers.1.mlp.up_proj.weight' holds 2 non-finite values "
        f"(1 NaN, 1 inf) of 131072; the checkpoint is damaged, re-download or repair it")
    state = job_state(work)
    attn = module_index(model, "model.layers.1.self_attn")
    assert state["progress"] == "measure" and state["last_module_idx"] == attn
    assert (work / state["hidden_states"]).is_file() and "model.layers.0.mlp" in state["measurement"]
    shutil.copyfile(next(convert_model.glob("*.safetensors")), shard)  # the user repairs the checkpoint
    assert convert(model, work, "--measure", "exact") == 0
    assert job_state(work)["progress"] == "finished"


@pytest.mark.parametrize("measure", ["exact", "fast"])
def test_overflowing_activations_are_attributed_to_the_block_that_produces_them(convert_model, tmp_path,
                                                                                capsys, measure):
    """Finite but huge gate and up weights: their product overflows float32 at the input of down_proj,
    found by the exact measurement's module loop or by the fast one's sensitivity pass, which runs first."""
    def blow_up(t):
        for name in ("gate_proj", "up_proj"):
            t[f"model.layers.1.mlp.{name}.weight"] *= 1e20

    model = edited_model(convert_model, tmp_path / "model", blow_up)
    assert convert(model, tmp_path / "job", "--measure", measure) == 1
    assert error_line(capsys.readouterr().err) == (
        "error: model.layers.1.mlp: non-finite activations in calibration row 0, first at the input of "
        "down_proj (the source model overflows in torch.float32; its weights are finite, so this block is "
        "where the activations blow up)")
    if measure == "exact":  # the blocks before it stay measured
        assert job_state(tmp_path / "job")["last_module_idx"] == module_index(model, "model.layers.1.self_attn")


def test_a_damaged_hidden_state_checkpoint_is_not_blamed_on_the_next_block(convert_model, tmp_path, capsys,
                                                                           monkeypatch):
    work = tmp_path / "job"
    interrupt_after(monkeypatch, convert_module, "measure_module", 2)  # at the third block (exact measurement)
    assert convert(convert_model, work, "--measure", "exact") == 130
    monkeypatch.undo()
    state = job_state(work)
    assert state["last_module_idx"] == module_index(convert_model, "model.layers.0.mlp")
    held = work / state["hidden_states"]
    hidden = load_file(str(held))
    hidden["hidden"][0, 3, 7] = float("nan")
    save_file(hidden, str(held))
    assert convert(convert_model, work, "--measure", "exact") == 1
    assert error_line(capsys.readouterr().err) == (
        "error: model.layers.1.self_attn: non-finite activations in calibration row 0: its input hidden states "
        "are already non-finite (a damaged hidden-state checkpoint?); rerun with -nr to start over")
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_checkpoint_write_is_one_line_and_the_rerun_resumes(convert_model, tmp_path, capsys,
                                                                     monkeypatch):
    """Permission denied while saving a hidden-state checkpoint (safetensors raises SafetensorError)."""
    work = tmp_path / "job"
    real_save = job_module.save_file
    target = module_index(convert_model, "model.layers.1.self_attn")

    def refuse(tensors, path):
        if f".hidden_states.measure.{target:04d}.safetensors." in path:
            raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
        real_save(tensors, path)

    monkeypatch.setattr(job_module, "save_file", refuse)
    assert convert(convert_model, work) == 1
    monkeypatch.undo()
    name = f"hidden_states.measure.{target:04d}.safetensors"
    assert error_line(capsys.readouterr().err) == (
        f"error: cannot write {work / name}: permission denied; work already checkpointed is kept, free space "
        "or fix permissions and rerun the same command to resume")
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    state = job_state(work)
    assert state["last_module_idx"] == target - 1 and (work / state["hidden_states"]).is_file()
    assert convert(convert_model, work) == 0


def test_disk_full_while_compiling_leaves_no_temporary_files_and_resumes(convert_model, tmp_path, capsys,
                                                                         monkeypatch):
    """The output file system fills up after the pre-flight check (another process took the space)."""
    work = tmp_path / "job"
    out = tmp_path / "out"
    with tmpfs(out, "192k"):
        monkeypatch.setattr(preflight, "free_bytes", lambda path: 1 << 40)
        assert convert(convert_model, work, "-cf", str(out / "model")) == 1
        monkeypatch.undo()
        assert error_line(capsys.readouterr().err) == (
            f"error: cannot write the model's shards in {out / 'model'}: disk full; work already checkpointed "
            "is kept, free space or fix permissions and rerun the same command to resume")
        assert sorted(p.name for p in (out / "model").iterdir()) == []
        state = job_state(work)
        assert state["progress"] == "compile"
        packed = sorted(p.name for p in (work / "out_tensor").iterdir())
        assert len(packed) == 15
    assert convert(convert_model, work, "-cf", str(out / "model")) == 0  # the tmpfs is gone: space freed
    err = capsys.readouterr().err
    assert "Measuring" not in err and "Quantizing" not in err
    with safe_open(str(out / "model" / "output.safetensors"), "pt") as f:
        packed_q = load_file(str(work / "out_tensor" / "model.layers.1.mlp.down_proj.safetensors"))
        for key, t in packed_q.items():
            assert torch.equal(f.get_tensor(key), t)


def test_a_weight_beyond_float16_is_named_when_computing_in_float16(convert_model, tmp_path):
    """On a GPU the blocks run in float16: a finite source value beyond its range is named as such."""
    def huge(t):
        t["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6

    model = edited_model(convert_model, tmp_path / "model", huge)
    source = SourceModel(model)
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.isfinite(source.finite_tensor(key, torch.float32)).all()
    with pytest.raises(Exl2Error) as e:
        source.finite_tensor(key, torch.float16)
    assert str(e.value) == (f"source tensor {key!r}: 1 non-finite value (0 NaN, 1 inf) of 131072 after conversion "
                            "to torch.float16 (values beyond its range, largest magnitude 1e+06)")
