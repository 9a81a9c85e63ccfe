"""The plugin author's experience: `exl2 plugins`, `exl2 inspect`, and a third-party plugin
(docs/example-plugin, Baichuan-7B) installed with pip, used for a conversion and removed again.

Plugin discovery reads the installed entry points once per process: the commands run in fresh ``exl2``
subprocesses, and this process calls ``reload_plugins()`` after installing and after removing.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIMS, TinyModel, make_tiny_model, write_bpe_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.model.exl2_weights import open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import reload_plugins, resolve_plan

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "docs" / "example-plugin"
EXAMPLE_DIST = "exl2-baichuan-example"
EXAMPLE_MODULE = "exl2_baichuan_example"
EXAMPLE_ARCHITECTURES = ["BaiChuanForCausalLM"]

#: Architectures each built-in plugin must list (it may list more, e.g. model_type aliases).
BUILT_IN = {
    "llama": {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
              "OrionForCausalLM", "IndexForCausalLM", "YiForCausalLM"},
    "mixtral": {"MixtralForCausalLM", "Qwen3MoeForCausalLM", "GemmoeForCausalLM"},
    "gemma": {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"},
    "cohere": {"CohereForCausalLM", "Cohere2ForCausalLM"},
    "dbrx": {"DbrxForCausalLM"},
    "granite": {"GraniteForCausalLM", "MiniCPMForCausalLM"},
    "glm": {"Glm4ForCausalLM"},
    "internlm": {"InternLM2ForCausalLM"},
    "starcoder": {"Starcoder2ForCausalLM", "GPTBigCodeForCausalLM", "GPT2LMHeadModel"},
    "vision": {"LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration",
               "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"},
}

#: A Baichuan-7B (Llama with q/k/v stacked in W_pack, as many key/value heads as query heads) that converts in
#: seconds (dimensions multiples of 32).
BAICHUAN_DIMS = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                     intermediate_size=128, vocab_size=320, num_hidden_layers=1)
CALIBRATION = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "-b", "4.0", "--device", "cpu"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a fresh interpreter (fresh plugin discovery)."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def exl2(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run("exl2core.cli", *args, timeout=timeout)


def pip(*args: str) -> None:
    result = run("pip", *args, "--disable-pip-version-check", "--no-input", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def listed_plugins() -> dict[str, tuple[str, list[str]]]:
    """``exl2 plugins`` parsed: plugin name → (where it comes from, architectures)."""
    result = exl2("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) % 2 == 0, result.stdout
    plugins = {}
    for head, archs in zip(lines[::2], lines[1::2]):
        name, source = head.split(maxsplit=1)
        plugins[name] = (source, archs.strip().split(", "))
    return plugins


def the_error(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_help():
    result = exl2("--help", timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    for command in ("convert", "inspect", "plugins"):
        assert command in result.stdout


def test_built_in_plugins_are_listed():
    plugins = listed_plugins()
    for name, architectures in BUILT_IN.items():
        source, listed = plugins[name]
        assert source.startswith("exl2core ") and f"(exl2_{name})" in source
        assert architectures <= set(listed)


def test_inspect_tiny_llama(tiny_llama, capsys):
    assert main(["inspect", str(tiny_llama.path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "architecture: LlamaForCausalLM (plugin: llama)"
    params = sum(p.numel() for p in tiny_llama.hf.parameters())
    assert out[2] == f"parameters:   {params:,}"
    layers = TINY_DIMS["num_hidden_layers"]
    assert out[3] == f"modules:      {2 * layers + 3}"
    modules = [line.split(maxsplit=2) for line in out[4:]]
    assert [m[:2] for m in modules] == [
        ["model.embed_tokens", "embedding"],
        *[[f"model.layers.{i}", kind] for i in range(layers) for kind in ("attention", "mlp")],
        ["model.norm", "norm"], ["lm_head", "head"]]
    hidden, inner, vocab = (TINY_DIMS[k] for k in ("hidden_size", "intermediate_size", "vocab_size"))
    q = TINY_DIMS["num_attention_heads"] * TINY_DIMS["head_dim"]
    kv = TINY_DIMS["num_key_value_heads"] * TINY_DIMS["head_dim"]
    assert modules[1][2] == (f"q_proj {hidden}→{q}, k_proj {hidden}→{kv}, v_proj {hidden}→{kv}, "
                             f"o_proj {q}→{hidden}")
    assert modules[2][2] == (f"gate_proj {hidden}→{inner}, up_proj {hidden}→{inner}, "
                             f"down_proj {inner}→{hidden}")
    assert modules[-1][2] == f"lm_head {hidden}→{vocab}"


def _unknown_architecture(model: Path, target: Path) -> None:
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    config.update(architectures=["NoSuchModelForCausalLM"], model_type="no_such_model")
    (target / "config.json").write_text(json.dumps(config))


def _truncated_weights(model: Path, target: Path) -> None:
    shutil.copytree(model, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("case, message", [
    ("missing", "no such model directory"),
    ("no-config", "no config.json"),
    ("unknown-architecture", "no installed plugin handles architecture 'NoSuchModelForCausalLM'"),
    ("truncated", "truncated or corrupt"),
])
def test_inspect_errors(tiny_llama, tmp_path, capsys, case, message):
    target = tmp_path / "model"
    if case == "no-config":
        target.mkdir()
        shutil.copy(tiny_llama.path / "model.safetensors", target)
    elif case == "unknown-architecture":
        _unknown_architecture(tiny_llama.path, target)
    elif case == "truncated":
        _truncated_weights(tiny_llama.path, target)
    assert main(["inspect", str(target)]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.fixture
def baichuan_model(tmp_path) -> TinyModel:
    """A tiny Llama written as a Baichuan-7B checkpoint (q, k, v stacked in ``W_pack``, ``architectures:
    BaiChuanForCausalLM``)."""
    model = make_tiny_model(tmp_path / "baichuan", "llama", **BAICHUAN_DIMS)
    weights = model.path / "model.safetensors"
    tensors = load_file(weights)
    for layer in range(BAICHUAN_DIMS["num_hidden_layers"]):
        p = f"model.layers.{layer}.self_attn."
        tensors[p + "W_pack.weight"] = torch.cat([tensors.pop(f"{p}{n}_proj.weight") for n in "qkv"])
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((model.path / "config.json").read_text())
    config.update(architectures=["BaiChuanForCausalLM"], model_type="baichuan")
    (model.path / "config.json").write_text(json.dumps(config))
    write_bpe_tokenizer(model.path, BAICHUAN_DIMS["vocab_size"])
    return model


@contextmanager
def example_plugin_installed(tmp_path: Path) -> Iterator[None]:
    """pip-install the example plugin (a copy: pip builds in the source tree) for the block, and make
    this process see it; uninstall it afterwards whatever happens."""
    package = tmp_path / "example-plugin"
    shutil.copytree(EXAMPLE_PLUGIN, package)
    pip("uninstall", "-y", EXAMPLE_DIST)  # a leftover of an interrupted run would hide what install does
    try:
        pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(package))
        importlib.invalidate_caches()
        reload_plugins()
        yield
    finally:
        pip("uninstall", "-y", EXAMPLE_DIST)
        sys.modules.pop(EXAMPLE_MODULE, None)
        reload_plugins()


def _check_conversion(model: TinyModel, out: Path) -> None:
    """The compiled EXL2 model: q/k/v split from W_pack and quantized under the names exllamav2's Llama reads,
    the norms copied exactly, the quantization config, and logits (read back through the plugin) close to the
    source model's."""
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4.0
    with safe_open(str(out / "output.safetensors"), "pt") as exl2_file, \
            safe_open(str(model.path / "model.safetensors"), "pt") as source_file:
        keys = set(exl2_file.keys())
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.0.self_attn.{name}.q_weight" in keys
        assert not any("W_pack" in key for key in keys)
        for name in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.0.{name}.weight"
            written, original = exl2_file.get_tensor(key), source_file.get_tensor(key)
            assert written.shape == (BAICHUAN_DIMS["hidden_size"],)
            assert torch.equal(written.float(), original.to(written.dtype).float())
    ids = model.random_ids(length=64)
    reference = torch.log_softmax(model.hf_logits(ids), -1)
    quantized = torch.log_softmax(open_model(out).logits(ids), -1)
    assert (reference.exp() * (reference - quantized)).sum(-1).mean().item() < 0.1


def test_example_plugin_install_convert_uninstall(baichuan_model, tmp_path):
    with example_plugin_installed(tmp_path):
        source, architectures = listed_plugins()["baichuan"]
        assert source.startswith(f"{EXAMPLE_DIST} 0.1.0") and architectures == EXAMPLE_ARCHITECTURES

        inspected = exl2("inspect", str(baichuan_model.path))
        assert inspected.returncode == 0, inspected.stderr
        assert "architecture: BaiChuanForCausalLM (plugin: baichuan)" in inspected.stdout
        assert re.search(r"model\.layers\.0 +attention +q_proj 64→64, k_proj 64→64", inspected.stdout)

        source_model = SourceModel(baichuan_model.path)
        ids = baichuan_model.random_ids()
        ours = forward_logits(source_model, resolve_plan(source_model.config), ids)
        assert (ours - baichuan_model.hf_logits(ids)).abs().max().item() <= 1e-4

        out = tmp_path / "exl2"
        converted = exl2("convert", "-i", str(baichuan_model.path), "-o", str(tmp_path / "job"),
                         "-cf", str(out), *CALIBRATION)
        assert converted.returncode == 0, converted.stderr
        _check_conversion(baichuan_model, out)
    assert "baichuan" not in listed_plugins()
    assert "no installed plugin handles architecture 'BaiChuanForCausalLM'" in the_error(
        exl2("inspect", str(baichuan_model.path)))
    with pytest.raises(Exl2Error, match="no installed plugin handles architecture 'BaiChuanForCausalLM'"):
        resolve_plan(SourceModel(baichuan_model.path).config)
