"""SourceModel: indexing of single/sharded/loose safetensors, lazy reads, weight dicts, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import exl2core.model.source as source_mod
from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.plugins import resolve_plan


@pytest.fixture(scope="module")
def sharded(tiny_model):
    return tiny_model("llama", max_shard_size="100KB")


def _copy(model, tmp_path):
    return shutil.copytree(model.path, tmp_path / "model")


def test_sharded_checkpoint_is_indexed_through_index_json(sharded):
    assert len(list(sharded.path.glob("model-*.safetensors"))) > 1
    src = SourceModel(sharded.path)
    state = sharded.hf.state_dict()
    assert sorted(src.keys()) == sorted(state)
    for key, ref in state.items():
        assert src.shape(key) == tuple(ref.shape)
        assert torch.equal(src.tensor(key), ref)
    assert src.numel() == sum(t.numel() for t in state.values())
    assert src.config.num_layers == 2 and src.config.architecture == "LlamaForCausalLM"


def test_unindexed_shards_are_all_read(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    (path / "model.safetensors.index.json").unlink()
    src = SourceModel(path)
    assert sorted(src.keys()) == sorted(sharded.hf.state_dict())


class _RecordingHandle:
    def __init__(self, handle, log, path):
        self._handle, self._log, self._path = handle, log, path

    def get_tensor(self, key):
        self._log.append((self._path, key))
        return self._handle.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_tensor_reads_only_that_tensor(sharded, monkeypatch):
    log: list[tuple[str, str]] = []
    real = source_mod.safe_open
    monkeypatch.setattr(source_mod, "safe_open",
                        lambda path, *a, **k: _RecordingHandle(real(path, *a, **k), log, path))
    src = SourceModel(sharded.path)
    assert log == []
    assert src.shape("model.layers.1.mlp.down_proj.weight") == (64, 128)
    assert src.has("model.norm.weight") and not src.has("model.norm.bias")
    assert log == []
    src.tensor("model.norm.weight")
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert log == [(str(sharded.path / index["model.norm.weight"]), "model.norm.weight")]


def test_tensor_casts_and_moves(tiny_llama):
    src = SourceModel(tiny_llama.path)
    t = src.tensor("model.norm.weight", dtype=torch.float16, device="cpu")
    assert t.dtype == torch.float16
    assert torch.equal(t, tiny_llama.hf.state_dict()["model.norm.weight"].half())


def test_module_weights_follow_the_plan(tiny_model):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    src = SourceModel(model.path)
    plan = resolve_plan(src.config)
    state = model.hf.state_dict()
    attn = plan.modules[1]
    w = src.module_weights(attn, torch.float32, "cpu")
    assert set(w) == {"q_proj", "q_proj.bias", "k_proj", "k_proj.bias", "v_proj", "v_proj.bias", "o_proj",
                      "input_norm"}
    assert torch.equal(w["k_proj.bias"], state["model.layers.0.self_attn.k_proj.bias"])
    assert torch.equal(w["input_norm"], state["model.layers.0.input_layernorm.weight"])
    assert set(src.module_weights(attn, torch.float32, "cpu", skip={"q_proj", "o_proj"})) == \
        {"q_proj.bias", "k_proj", "k_proj.bias", "v_proj", "v_proj.bias", "input_norm"}
    assert not src.has("lm_head.weight")
    head = src.module_weights(plan.head, torch.float16, "cpu")
    assert torch.equal(head["lm_head"], state["model.embed_tokens.weight"].half())


def test_tokenizer(tiny_llama, tmp_path):
    assert SourceModel(tiny_llama.path).tokenizer.encode("w5 w7 w299").ids == [5, 7, 299]
    path = _copy(tiny_llama, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(Exl2Error, match="no tokenizer.json"):
        SourceModel(path).tokenizer


@pytest.mark.parametrize("size", [lambda n: n // 2, lambda n: n - 1, lambda n: 6])
def test_truncated_shard_is_reported(sharded, tmp_path, size):
    path = _copy(sharded, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    os.truncate(shard, size(shard.stat().st_size))
    with pytest.raises(Exl2Error, match=f"{shard.name}.*truncated or corrupt"):
        SourceModel(path)


def test_corrupt_header_is_reported(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(Exl2Error, match="truncated or corrupt"):
        SourceModel(path)


def test_missing_directory_config_and_weights(tiny_llama, tmp_path):
    with pytest.raises(Exl2Error, match="no such model directory"):
        SourceModel(tmp_path / "nowhere")
    path = _copy(tiny_llama, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(Exl2Error, match="no .safetensors"):
        SourceModel(path)
    (path / "config.json").unlink()
    with pytest.raises(Exl2Error, match="no config.json"):
        SourceModel(path)


def test_index_naming_a_missing_shard(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(Exl2Error, match=f"{shard.name}.*missing"):
        SourceModel(path)


def test_unknown_tensor_and_duplicate_tensors(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path)
    with pytest.raises(Exl2Error, match="no tensor 'model.nothing.weight'"):
        SourceModel(path).tensor("model.nothing.weight")
    (path / "model.safetensors").rename(path / "a.safetensors")
    save_file({"model.norm.weight": torch.ones(64)}, path / "b.safetensors")
    with pytest.raises(Exl2Error, match="'model.norm.weight' is in both a.safetensors and b.safetensors"):
        SourceModel(path)
