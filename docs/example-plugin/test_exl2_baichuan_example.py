"""The plugin's own test: exl2core running this plugin's plan gives the logits of the same model in
transformers (Baichuan-7B is Llama with q/k/v fused in ``W_pack``, so transformers runs it as Llama).

Run it after ``pip install -e .`` (exl2core finds plugins only through installed entry points)::

    pytest test_exl2_baichuan_example.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import installed_plugins, resolve_plan

#: Baichuan-7B has as many key/value heads as query heads (W_pack is 3 × hidden rows).
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
            num_hidden_layers=2, vocab_size=320, max_position_embeddings=256)


def tiny_baichuan(path, **overrides) -> torch.nn.Module:
    """A random Llama saved to ``path`` as a Baichuan-7B checkpoint (q, k, v stacked into ``W_pack``,
    ``architectures: BaiChuanForCausalLM``); returns the Llama. Weights are unit-scale and norm weights ≠ 1:
    transformers' own initialisation (std 0.02, norms = 1) gives near-uniform logits that hide most mistakes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.3 * noise if "norm" in name else 0.3 * noise)
            else:
                p.copy_(noise if "embed" in name else noise / math.sqrt(p.shape[-1]))
    path = Path(path)
    model.save_pretrained(path)
    tensors = {k: t.contiguous() for k, t in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}.self_attn."
        tensors[p + "W_pack.weight"] = torch.cat([tensors.pop(f"{p}{n}_proj.weight") for n in "qkv"])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["BaiChuanForCausalLM"], model_type="baichuan")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return model


def test_plugin_is_installed():
    served = {arch for p in installed_plugins() for arch in p.architectures}
    assert "BaiChuanForCausalLM" in served, "install the plugin first: pip install -e ."


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}], ids=["plain", "tied-head"])
def test_logits_match_transformers(tmp_path, overrides):
    model = tiny_baichuan(tmp_path, **overrides)
    source = SourceModel(tmp_path)
    plan = resolve_plan(source.config)
    k = plan.modules[1].linear("k_proj")
    assert (k.source, k.rows) == ("model.layers.0.self_attn.W_pack", (64, 128))
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.float()
    assert (forward_logits(source, plan, ids) - expected).abs().max().item() <= 1e-4
