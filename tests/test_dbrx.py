"""DBRX (plugins/dbrx): the forward against transformers from the released config layout, the fused tensors
read as exllamav2's separate linears, and what exllamav2 0.3.2 cannot run (clip_qkv, p-norm routing)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from conftest import DBRX_SHAPE, dbrx_as_published, make_tiny_model
from exl2core import cli
from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import resolve_plan


def unclipped(model) -> None:
    """transformers' DBRX without q/k/v clipping (transformers 5.24 fails on ``clip_qkv = None``: clamp gets
    no bound, so the bound is made infinite)."""
    for block in model.hf.transformer.blocks:
        block.norm_attn_norm.attn.clip_qkv = float("inf")


def tiny_dbrx(path, **attn_config):
    """A tiny DBRX whose config.json is the released layout with ``attn_config`` updated; its transformers model
    clips as ``attn_config`` says."""
    model = make_tiny_model(path, "dbrx", **DBRX_SHAPE)
    dbrx_as_published(path, **attn_config)
    for block in model.hf.transformer.blocks:
        block.norm_attn_norm.attn.clip_qkv = attn_config.get("clip_qkv") or float("inf")
    return model


def plan_of(path):
    source = SourceModel(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "DbrxForCausalLM with clip_qkv")
        return source, resolve_plan(source.config)


def test_logits_match_transformers(tmp_path):
    model = tiny_dbrx(tmp_path)
    source, plan = plan_of(tmp_path)
    attn, moe = plan.modules[1], plan.modules[2]
    k = attn.linear("k_proj")
    assert (k.key, k.source, k.rows) == ("model.layers.0.self_attn.k_proj",
                                         "transformer.blocks.0.norm_attn_norm.attn.Wqkv", (64, 96))
    up, down = moe.linear("experts.1.w3"), moe.linear("experts.1.w2")
    assert (up.key, up.source, up.weight_suffix, up.rows) == (
        "model.layers.0.block_sparse_moe.experts.1.v1", "transformer.blocks.0.ffn.experts.mlp.v1", "", (64, 128))
    assert (down.transposed, down.columns, down.rows) == (True, (64, 128), None)
    with pytest.raises(Exl2Error, match="columns of its source cannot have a bias"):
        dataclasses.replace(down, bias=True)
    assert moe.tensors["router"] == "transformer.blocks.0.ffn.router.layer.weight" and moe.renormalize
    assert plan.output_name("transformer.blocks.0.norm_attn_norm.norm_2.weight") == (
        "model.layers.0.post_attention_layernorm.weight")
    assert source.config.num_kv_heads == 2 and attn.norm.kind == "layer"
    ids = model.random_ids()
    assert (forward_logits(source, plan, ids) - model.hf_logits(ids)).abs().max().item() <= 1e-4


def test_clip_qkv_converts_unclipped_with_one_warning(tmp_path, capsys):
    """exllamav2 0.3.2 does not clip q/k/v: the plan runs the model as it does (transformers' model with the
    clip removed), and the CLI says so in one line."""
    model = tiny_dbrx(tmp_path, clip_qkv=0.5)  # small enough to bind on this model
    source, plan = plan_of(tmp_path)
    ids = model.random_ids()
    ours = forward_logits(source, plan, ids)
    clipped = model.hf_logits(ids)
    unclipped(model)
    assert (ours - model.hf_logits(ids)).abs().max().item() <= 1e-4
    assert (ours - clipped).abs().max().item() > 1e-2
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["inspect", str(tmp_path)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["warning: DbrxForCausalLM with clip_qkv = 0.5: exllamav2 0.3.2 does not clip q/k/v, so where "
                   "they exceed ±0.5 it will not run this model as transformers does (converted and calibrated "
                   "without the clip, as exllamav2 runs it)"]


@pytest.mark.parametrize("ffn, message", [
    (dict(moe_normalize_expert_weights=2.0), "moe_normalize_expert_weights = 2.0 is not supported"),
    (dict(ffn_act_fn={"name": "gelu"}), "ffn_act_fn 'gelu' is not supported"),
])
def test_what_exllamav2_cannot_run_is_refused(tmp_path, ffn, message):
    tiny_dbrx(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ffn_config"].update(ffn)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exl2Error, match=message):
        resolve_plan(SourceModel(tmp_path).config)
