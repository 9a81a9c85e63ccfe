"""The plugin's own test: exl2core running this plugin's plan gives transformers' Qwen3 logits.

Run it after ``pip install -e .`` (exl2core finds plugins only through installed entry points)::

    pytest test_exl2_qwen3_example.py
"""

from __future__ import annotations

import math

import pytest
import torch

from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import installed_plugins, resolve_plan

#: head_dim × heads (128) is not hidden_size (64), as in real Qwen3 checkpoints.
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
            num_hidden_layers=2, vocab_size=300, max_position_embeddings=256)


def tiny_qwen3(path, **overrides) -> torch.nn.Module:
    """A random Qwen3 saved to ``path``. Weights are unit-scale and norm weights ≠ 1: transformers'
    own initialisation (std 0.02, norms = 1) gives near-uniform logits that hide most mistakes."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**TINY, **overrides})
    model = Qwen3ForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.3 * noise if "norm" in name else 0.3 * noise)
            else:
                p.copy_(noise if "embed" in name else noise / math.sqrt(p.shape[-1]))
    model.save_pretrained(path)
    return model


def test_plugin_is_installed():
    served = {arch for p in installed_plugins() for arch in p.architectures}
    assert "Qwen3ForCausalLM" in served, "install the plugin first: pip install -e ."


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True}],
                         ids=["plain", "tied-head", "attention-bias"])
def test_logits_match_transformers(tmp_path, overrides):
    model = tiny_qwen3(tmp_path, **overrides)
    source = SourceModel(tmp_path)
    plan = resolve_plan(source.config)
    attention = plan.modules[1]
    assert attention.tensors["q_norm"] == "model.layers.0.self_attn.q_norm.weight"
    assert attention.linear("q_proj").out_features == TINY["num_attention_heads"] * TINY["head_dim"]
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.float()
    assert (forward_logits(source, plan, ids) - expected).abs().max().item() <= 1e-4
