"""exl2core's EXL2 output in the real exllamav2 0.3.2: it loads, every packed linear is taken as EXL2, and
exllamav2's forward gives the logits exl2core's own forward gives for the same files.

Skipped unless a CUDA device is present and exllamav2 imports (its first import JIT-compiles its CUDA
extension: minutes). Tiny random models of every family exl2core says exllamav2 can load are converted
with ``exl2 convert -cf`` on the GPU; rows of 96 tokens take exllamav2's dequantize-then-GEMM path and
rows of 4 tokens its quantized-GEMM kernels (and the fused MoE kernel). The FP16 sources are compared
too, so a mismatch in how the two read a config shows apart from one in the packed weights.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (exllamav2 runs on CUDA only)", allow_module_level=True)
# exllamav2 0.3.2 computes attention wrongly through the SDPA of torch >= 2.11; read at import time.
os.environ["EXLLAMA_NO_SDPA"] = "1"
try:
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.linear import ExLlamaV2Linear
except Exception as e:  # not installed, or its extension did not build: nothing here can run
    pytest.skip(f"exllamav2 does not import: {type(e).__name__}: {e}", allow_module_level=True)

from safetensors import safe_open

from conftest import CONVERT_DIMS, make_tiny_model, to_classic_style, write_bpe_tokenizer
from exl2core.cli import main
from exl2core.model.exl2_weights import open_model

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

#: Mean KL(exl2core ‖ exllamav2) per position allowed: both run the same weights, so only arithmetic
#: (exllamav2's fp16 kernels) separates them.
KL_LIMIT = 1e-3
DEVICE = "cuda"
CAL = ["-mr", "2", "-ml", "128", "-r", "4", "-l", "128", "--device", DEVICE]
MOE = dict(num_experts_per_tok=2, num_hidden_layers=2)
#: family → (transformers model_type, config overrides, scale of the embedding). Gemma's head is its
#: unit-scale embedding; shrunk, its softmaxes are not one-hot, which would hide errors.
FAMILIES = {
    "llama": ("llama", {}, 1.0),
    "mistral": ("mistral", {}, 1.0),
    "qwen2": ("qwen2", {}, 1.0),
    "mixtral": ("mixtral", dict(num_local_experts=4, intermediate_size=128, **MOE), 1.0),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=128, norm_topk_prob=True, **MOE),
                  1.0),
    "gemma": ("gemma", {}, 0.1),
    "gemma2": ("gemma2", {}, 0.1),
    "cohere": ("cohere", {}, 1.0),
    # Two layers, both sliding-window layers with RoPE: 0.3.2 applies RoPE on Cohere2's global layers
    # too (model.py builds every layer the same way), where transformers and exl2core apply none.
    "cohere2": ("cohere2", {}, 1.0),
}
#: (family, target bpw, head bits): Llama across the bit widths 2…8, every other family at 4.0.
CASES = [("llama", 2.5, 6), ("llama", 4.0, 6), ("llama", 6.0, 8),
         *((family, 4.0, 6) for family in FAMILIES if family != "llama")]
ROW_LENGTHS = (96, 96, 4)
#: An EXL2 directory exl2core wrote from a real model (bench/device_check.sh sets it to its SmolLM2-135M
#: output): real weights and text reach value ranges the tiny random models do not.
REAL_MODEL_ENV = "EXL2_COMPAT_MODEL"


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> Path:
    """One trained tokenizer.json (vocabulary of CONVERT_DIMS), copied into every model."""
    path = tmp_path_factory.mktemp("tokenizer")
    write_bpe_tokenizer(path, CONVERT_DIMS["vocab_size"])
    return path / "tokenizer.json"


@pytest.fixture(scope="session")
def source_model(tmp_path_factory, bpe_tokenizer):
    """``source_model(family)`` → a tiny checkpoint in the classic config style, the one exllamav2 reads
    (it takes ``rope_theta`` at the top level only)."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            model_type, overrides, embed_scale = FAMILIES[family]
            dims = {**CONVERT_DIMS, **overrides}
            model = make_tiny_model(tmp_path_factory.mktemp(family), model_type, **dims)
            if embed_scale != 1.0:
                with torch.no_grad():
                    model.hf.get_input_embeddings().weight.mul_(embed_scale)
                model.hf.save_pretrained(model.path)
            to_classic_style(model.path / "config.json")
            shutil.copy(bpe_tokenizer, model.path / "tokenizer.json")
            cache[family] = model.path
        return cache[family]

    return make


@pytest.fixture(scope="session")
def converted(tmp_path_factory, source_model):
    """``converted(family, bits, head_bits)`` → the ``-cf`` directory; one measurement per family."""
    measurements: dict[str, Path] = {}
    outputs: dict[tuple, Path] = {}

    def convert(family: str, bits: float, head_bits: int) -> Path:
        src = source_model(family)
        key = (family, bits, head_bits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. experts that few calibration tokens reach
            if family not in measurements:
                work = tmp_path_factory.mktemp(f"{family}_measure")
                measurements[family] = work / "measurement.json"
                assert main(["convert", "-i", str(src), "-o", str(work / "job"), "-om",
                             str(measurements[family]), *CAL]) == 0
            if key not in outputs:
                work = tmp_path_factory.mktemp(f"{family}_{bits}_hb{head_bits}")
                outputs[key] = work / "model"
                assert main(["convert", "-i", str(src), "-o", str(work / "job"), "-m",
                             str(measurements[family]), "-b", str(bits), "-hb", str(head_bits),
                             "-cf", str(outputs[key]), *CAL]) == 0
        return outputs[key]

    return convert


def token_rows(vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (1, n), generator=g) for n in ROW_LENGTHS]


def all_linears(modules) -> list:
    """exllamav2's linear layers, found through each module's submodules (attention, MLP, MoE, parallel)."""
    found = []
    for module in modules:
        if isinstance(module, ExLlamaV2Linear):
            found.append(module)
        found += all_linears(getattr(module, "submodules", []))
    return found


def exllamav2_run(model_dir: Path, rows: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, bool]]:
    """exllamav2's float32 logits of each row (vocabulary columns only) and, per linear, whether it
    loaded as a quantized matrix."""
    config = ExLlamaV2Config(str(model_dir))  # the constructor reads the directory (prepare())
    model = ExLlamaV2(config)
    model.load()
    try:
        quantized = {lin.key: lin.is_quant() for lin in all_linears(model.modules)}
        # forward() without a cache runs the whole row; its fp16 logits are padded to a multiple of 32.
        logits = [model.forward(ids).float()[0, :, :config.vocab_size].cpu() for ids in rows]
    finally:
        model.unload()
        torch.cuda.empty_cache()
    return logits, quantized


def exl2core_logits(model_dir: Path, rows: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    model = open_model(model_dir, DEVICE)
    return [model.logits(ids, dtype=dtype, device=DEVICE)[0].float().cpu() for ids in rows]


def mean_kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over positions of KL(ref ‖ test), in nats."""
    p = torch.log_softmax(ref.double(), -1)
    q = torch.log_softmax(test.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def packed_linears(model_dir: Path) -> set[str]:
    keys = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            keys |= {k[: -len(".q_weight")] for k in handle.keys() if k.endswith(".q_weight")}
    return keys


def assert_close(reference: list[torch.Tensor], theirs: list[torch.Tensor], what: str) -> None:
    for n, (ref, test) in zip(ROW_LENGTHS, zip(reference, theirs)):
        assert test.shape == ref.shape, f"{what}: logits {tuple(test.shape)} vs {tuple(ref.shape)}"
        assert torch.isfinite(test).all(), f"{what}: exllamav2 gave non-finite logits on a {n}-token row"
        kl = mean_kl(ref, test)
        assert kl <= KL_LIMIT, f"{what}, {n}-token row: KL(exl2core ‖ exllamav2) = {kl:.2e} > {KL_LIMIT}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp16_source_reads_alike(source_model, family):
    """Both read the tiny source's config and weights the same way (exllamav2 in fp16, exl2core fp32)."""
    src = source_model(family)
    rows = token_rows(CONVERT_DIMS["vocab_size"])
    theirs, _ = exllamav2_run(src, rows)
    assert_close(exl2core_logits(src, rows, torch.float32), theirs, f"{family} FP16 source")


@pytest.mark.parametrize("family,bits,head_bits", CASES, ids=[f"{f}-{b}-hb{h}" for f, b, h in CASES])
def test_exl2_output_runs_alike_in_exllamav2(converted, family, bits, head_bits):
    out = converted(family, bits, head_bits)
    rows = token_rows(CONVERT_DIMS["vocab_size"], seed=1)
    theirs, quantized = exllamav2_run(out, rows)

    packed = packed_linears(out)
    assert "lm_head" in packed and any(".layers." in key for key in packed)
    assert {key for key, q in quantized.items() if q} == packed, "exllamav2 took other linears as EXL2"
    for dtype in (torch.float32, torch.float16):
        assert_close(exl2core_logits(out, rows, dtype), theirs, f"{family} {bits} bpw, exl2core {dtype}")


@pytest.mark.skipif(not os.environ.get(REAL_MODEL_ENV), reason=f"set {REAL_MODEL_ENV} to an exl2core output")
def test_real_model_output_runs_alike_in_exllamav2():
    from exl2core.eval.data import load_text
    from exl2core.model.source import SourceModel

    out = Path(os.environ[REAL_MODEL_ENV])
    ids = SourceModel(out).tokenizer.encode(load_text(), add_special_tokens=False).ids
    starts = [0, 1000, 2000]
    rows = [torch.tensor([ids[a:a + n]]) for a, n in zip(starts, ROW_LENGTHS)]
    theirs, quantized = exllamav2_run(out, rows)
    assert {key for key, q in quantized.items() if q} == packed_linears(out), "exllamav2 took other linears"
    for dtype in (torch.float32, torch.float16):
        assert_close(exl2core_logits(out, rows, dtype), theirs, f"{out.name}, exl2core {dtype}")
