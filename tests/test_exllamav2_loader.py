"""exllamav2 0.3.2's own loading code, run on the CPU over exl2core's output of the suite's tiny models.

The wheel of exllamav2 0.3.2 is pure Python plus C++/CUDA sources that it compiles on first import; here its
extension module is replaced (through ``sys.modules``) by a stub that re-implements the few functions its
loader calls (``stloader_read``, ``make_group_map``, and ``make_q_matrix``'s argument checks, from
``exllamav2_ext/ext_stloader.cpp`` and ``ext_qmatrix.cpp``) and records what ``make_q_matrix`` would upload.
Then exllamav2's ``ExLlamaV2Config.prepare()`` (architecture detection, config keys, its tensor-key check),
``ExLlamaV2(config)`` and every ``ExLlamaV2Linear.load()`` (``load_weight()``, the bias assertions, the Python
half of ``ext.make_q_matrix()``) run unchanged. The recorded tensors are dequantized the way exllamav2's
``reconstruct_kernel`` (``cuda/q_matrix.cu``) reads them — rows walked by width 8 → 2, scales found through
the group map, rows scattered through ``q_perm`` — and must equal the weights exl2core's own forward uses.

The wheel comes from ``$EXL2_EXLLAMAV2_WHEEL`` if set, else from the wheel cache (``$EXL2_CACHE/wheels``,
default ``~/.cache/exl2core/wheels``), else ``pip download`` fills that cache; without it the module skips.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import (DBRX_SHAPE, GEMMOE_AS_MIXTRAL, MINICPM_AS_GRANITE, ORION_AS_STABLELM, TINY_DIMS,
                      dbrx_as_published, granite_as_minicpm, llama_as_index, llama_as_internlm2, llama_as_yi,
                      make_tiny_model, mixtral_as_gemmoe, stablelm_as_orion, write_bpe_tokenizer)
from exl2core.cli import main
from exl2core.model.exl2_weights import open_model
from exl2core.quant.pack import QUANT_SUFFIXES, dequantize

EXLLAMAV2_VERSION = "0.3.2"
WHEEL_ENV = "EXL2_EXLLAMAV2_WHEEL"
#: Minimal calibration: the loader checks names, layouts and values, not quality.
CAL = ["-mr", "1", "-ml", "32", "-r", "2", "-l", "32", "--device", "cpu"]
VOCAB = 300  # the head pads to 320 output features, as exllamav2 expects
DIMS = dict(TINY_DIMS, vocab_size=VOCAB)
MOE = dict(num_experts_per_tok=2, intermediate_size=64)
#: GPT-2's own key (n_inner) and the generic ones TINY_DIMS sets, made consistent with it.
GPT = dict(num_key_value_heads=4, intermediate_size=256, n_inner=256, activation_function="gelu_new")
#: case → (transformers model_type, config overrides, extra convert arguments).
TEXT_MODELS = {
    "llama": ("llama", {}, []),
    "llama-3.7bpw": ("llama", {}, ["-b", "3.7", "-hb", "3"]),
    "llama-6bpw-tied": ("llama", dict(tie_word_embeddings=True), ["-b", "6.0", "-hb", "8"]),
    "mistral": ("mistral", {}, []),
    "qwen2": ("qwen2", {}, []),
    "qwen3": ("qwen3", dict(head_dim=32), []),
    "phi3": ("phi3", dict(pad_token_id=0, eos_token_id=2), []),  # fused qkv_proj / gate_up_proj, split
    "starcoder2": ("starcoder2", dict(norm_epsilon=1e-4), []),
    "glm4": ("glm4", dict(pad_token_id=0, eos_token_id=2), []),  # q/k/v bias, partial rotary 0.5
    # learned positions, c_attn split by rows (GPT-2: Conv1D weights, transposed); names from exllamav2's keymaps
    "gpt2": ("gpt2", GPT, []),
    "gpt_bigcode": ("gpt_bigcode", dict(GPT, num_key_value_heads=1, multi_query=True), []),
    # remote code only: a Granite rewritten in MiniCPM's published layout (REMOTE_CODE)
    "minicpm": ("granite", MINICPM_AS_GRANITE, []),
    "orion": ("stablelm", ORION_AS_STABLELM, []),
    "internlm2": ("llama", {}, []),
    "yi": ("llama", {}, []),  # the norms named ln1 / ln2
    "index": ("llama", {}, []),  # norm_head: the head quantized normalized, as exllamav2 reads it
    # multipliers: o_proj, down_proj and the head load with a prescale
    "granite": ("granite", dict(embedding_multiplier=4.0, attention_multiplier=0.0625, residual_multiplier=0.22,
                                logits_scaling=8.0), []),
    "mixtral": ("mixtral", dict(num_local_experts=4, **MOE), []),
    "gemmoe": ("mixtral", GEMMOE_AS_MIXTRAL, []),  # remote code only: Gemma's norms, scaled embedding, tied head
    # fused Wqkv and experts (w1 / v1 / w2 [experts · ffn, hidden]) written as exllamav2's separate linears
    "dbrx": ("dbrx", DBRX_SHAPE, []),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=64, norm_topk_prob=True, **MOE), []),
    "gemma": ("gemma", {}, []),
    "gemma2": ("gemma2", {}, []),
    "gemma3_text": ("gemma3_text", dict(sliding_window=8), []),
    "cohere": ("cohere", {}, []),
    "cohere2": ("cohere2", {}, []),
}
#: case → the rewrite of its transformers checkpoint into the published layout of a remote-code architecture
#: (or, for DBRX, into its released config.json, the shape only in attn_config / ffn_config).
REMOTE_CODE = {"minicpm": granite_as_minicpm, "orion": stablelm_as_orion, "internlm2": llama_as_internlm2,
               "index": llama_as_index, "yi": llama_as_yi, "gemmoe": mixtral_as_gemmoe,
               "dbrx": dbrx_as_published}
REMOTE_ARCHITECTURES = ("MiniCPMForCausalLM", "OrionForCausalLM", "InternLM2ForCausalLM", "IndexForCausalLM",
                        "YiForCausalLM", "GemmoeForCausalLM")
VISION_MODELS = ("mistral3", "qwen2_vl", "gemma3")
CASES = [*TEXT_MODELS, *(f"vlm-{name}" for name in VISION_MODELS)]
#: Linears exllamav2 always loads unquantized: the MoE routers.
ROUTER_SUFFIXES = (".block_sparse_moe.gate", ".mlp.gate")
#: exllamav2's name for every quantized linear that carries a bias in these models.
BIASED = {"qwen2": ("q_proj", "k_proj", "v_proj"), "vlm-qwen2_vl": ("q_proj", "k_proj", "v_proj"),
          "glm4": ("q_proj", "k_proj", "v_proj"),
          **dict.fromkeys(("gpt2", "gpt_bigcode"), ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
          "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")}
#: Image preprocessing files that exllamav2's prepare() requires of each VLM (only the keys it reads).
PREPROCESSOR = {
    "mistral3": dict(image_processor_type="PixtralImageProcessor", patch_size=8, resample=3,
                     rescale_factor=1 / 255, size={"longest_edge": 32}),
    "qwen2_vl": dict(image_processor_type="Qwen2VLImageProcessor", patch_size=4, merge_size=2,
                     temporal_patch_size=2, min_pixels=64, max_pixels=4096),
    "gemma3": dict(image_processor_type="Gemma3ImageProcessor", resample=2, rescale_factor=1 / 255,
                   size={"height": 32, "width": 32}),
}


# -- the exllamav2 wheel, imported with a stub extension -----------------------------------------------


def wheel_cache() -> Path:
    base = os.environ.get("EXL2_CACHE") or Path.home() / ".cache" / "exl2core"
    return Path(base) / "wheels"


def find_or_download_wheel() -> Path:
    """exllamav2's wheel: ``$EXL2_EXLLAMAV2_WHEEL``, else the cache, else downloaded into it; skips if none."""
    if os.environ.get(WHEEL_ENV):
        path = Path(os.environ[WHEEL_ENV])
        if not path.is_file():
            pytest.fail(f"{WHEEL_ENV}={path} is not a file")
        return path
    cache = wheel_cache()
    pattern = f"exllamav2-{EXLLAMAV2_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "-d", str(cache), f"exllamav2=={EXLLAMAV2_VERSION}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot download exllamav2 {EXLLAMAV2_VERSION}: {e}")
        found = sorted(cache.glob(pattern))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot download exllamav2 {EXLLAMAV2_VERSION}: {last}")
    return found[-1]


@dataclass
class Upload:
    """The tensors one ``make_q_matrix`` call hands to the extension (EXL2 arguments only)."""

    q_weight: torch.Tensor
    q_perm: torch.Tensor
    q_invperm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    q_group_map: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class StubExtension:
    """What the stub extension saw: one Upload per ``make_q_matrix`` handle, and every byte range read."""

    uploads: dict[int, Upload] = field(default_factory=dict)
    reads: set[tuple[str, int]] = field(default_factory=set)  # (file, offset of the tensor's data)
    handles: itertools.count = field(default_factory=lambda: itertools.count(1))

    def module(self) -> types.ModuleType:
        stub = types.ModuleType("exllamav2_ext")
        stub.stloader_read = self.stloader_read
        stub.make_group_map = make_group_map
        stub.make_q_matrix = self.make_q_matrix
        stub.free_q_matrix = lambda handle: self.uploads.pop(handle)

        def missing(name: str):
            raise AttributeError(f"the stub exllamav2_ext has no {name}: exllamav2 called more of its "
                                 f"extension than this test re-implements")

        stub.__getattr__ = missing
        return stub

    def make_q_matrix(self, q_weight, q_perm, q_invperm, q_scale, q_scale_max, q_groups, q_group_map,
                      gptq_qzeros, gptq_scales, gptq_g_idx, bias, temp_dq, max_dq_rows) -> int:
        """``ext_qmatrix.cpp``'s checks for an EXL2 matrix; records the tensors and returns a handle."""
        for t, dtype in ((q_weight, torch.int32), (q_perm, torch.int16), (q_invperm, torch.int16),
                         (q_scale, torch.int32), (q_scale_max, torch.float16), (q_groups, torch.int16),
                         (q_group_map, torch.int16)):
            assert t.dtype == dtype, f"make_q_matrix: {t.dtype} where {dtype} is required"
        assert all(t.is_meta for t in (gptq_qzeros, gptq_scales, gptq_g_idx)), "GPTQ tensors for EXL2"
        assert q_perm.shape[0] == q_invperm.shape[0], "q_perm and q_invperm differ in length"
        assert q_weight.shape[1] == q_scale.shape[1] * 8, "q_scale does not have N/8 words per group"
        assert q_scale_max.shape[0] == q_scale.shape[0], "q_scale_max and q_scale differ in groups"
        has_bias = not bias.is_meta
        if has_bias:
            assert bias.dtype == torch.float16 and bias.shape[0] == q_weight.shape[1], "bad bias"
        handle = next(self.handles)
        self.uploads[handle] = Upload(q_weight.clone(), q_perm.clone(), q_invperm.clone(), q_scale.clone(),
                                      q_scale_max.clone(), q_groups.clone(), q_group_map.clone(),
                                      bias.clone() if has_bias else None)
        return handle

    def stloader_read(self, filename: str, offset: int, size: int, target: torch.Tensor) -> None:
        """``ext_stloader.cpp``: ``size`` bytes at ``offset`` of the file into the (CPU) tensor's storage."""
        assert target.device.type == "cpu" and target.is_contiguous()
        assert target.numel() * target.element_size() == size, "tensor size and byte range differ"
        with open(filename, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        assert len(data) == size, f"short read from {filename}"
        if size:
            target.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.reads.add((str(Path(filename).resolve()), offset))


def make_group_map(q_groups: torch.Tensor, num_qrows: int) -> torch.Tensor:
    """``ext_qmatrix.cpp``: per row, (group index, rows left in the group), from signed int16 q_groups."""
    assert q_groups.dtype == torch.int16
    groups = q_groups.tolist()
    count = len(groups) // 2
    entries = []
    for i in range(count):
        bits = groups[2 * i]
        qrows = groups[2 * i + 3] - groups[2 * i + 1] if i < count - 1 else num_qrows - groups[2 * i + 1]
        rows = qrows * 32 // bits
        for j in range(rows):
            entries += [i, rows - j]
    return torch.tensor(entries, dtype=torch.int16)


@dataclass
class Exllamav2:
    """exllamav2's classes, imported from the wheel over the stub extension."""

    ExLlamaV2: type
    ExLlamaV2Config: type
    ExLlamaV2Linear: type
    ExLlamaV2Module: type
    extension: StubExtension


@pytest.fixture(scope="module")
def exllamav2(tmp_path_factory):
    """exllamav2 0.3.2 imported from its wheel with the stub extension; sys.modules restored afterwards
    (a real exllamav2, where one is installed, stays untouched for test_exllamav2_compat)."""
    wheel = find_or_download_wheel()
    unpacked = tmp_path_factory.mktemp("exllamav2_wheel")
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    except zipfile.BadZipFile as e:
        pytest.fail(f"{wheel} is not a wheel ({e}); delete it to download it again")
    names = ("exllamav2", "exllamav2_ext")
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] in names}
    for k in saved:
        del sys.modules[k]
    extension = StubExtension()
    sys.modules["exllamav2_ext"] = extension.module()
    sys.path.insert(0, str(unpacked))
    synchronize = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None  # get_tensor() syncs before each read
    try:
        from exllamav2 import ExLlamaV2, ExLlamaV2Config
        from exllamav2.linear import ExLlamaV2Linear
        from exllamav2.module import ExLlamaV2Module
        from exllamav2.version import __version__

        assert __version__ == EXLLAMAV2_VERSION
        yield Exllamav2(ExLlamaV2, ExLlamaV2Config, ExLlamaV2Linear, ExLlamaV2Module, extension)
    finally:
        torch.cuda.synchronize = synchronize
        sys.path.remove(str(unpacked))
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[k]
        sys.modules.update(saved)


# -- tiny models converted by exl2core ----------------------------------------------------------------


def source_model(root: Path, case: str) -> Path:
    """A tiny checkpoint of ``case`` with a trained tokenizer (and, for VLMs, its preprocessor config)."""
    if case.startswith("vlm-"):
        from test_vision import make_vlm

        name = case[len("vlm-"):]
        make_vlm(root, name, layers=2, bpe=True)
        (root / "preprocessor_config.json").write_text(
            json.dumps(dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, **PREPROCESSOR[name])))
        return root
    model_type, overrides, _ = TEXT_MODELS[case]
    make_tiny_model(root, model_type, **{**DIMS, **overrides})
    if case in REMOTE_CODE:
        REMOTE_CODE[case](root)
    write_bpe_tokenizer(root, VOCAB)
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``converted(case)`` → exl2core's ``-cf`` output directory of that tiny model (cached)."""
    cache: dict[str, Path] = {}

    def convert(case: str) -> Path:
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            src = source_model(root / "src", case)
            extra = [] if case.startswith("vlm-") else TEXT_MODELS[case][2]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. experts few calibration tokens reach
                assert main(["convert", "-i", str(src), "-o", str(root / "job"), "-cf", str(root / "out"),
                             *CAL, *extra]) == 0
            cache[case] = root / "out"
        return cache[case]

    return convert


# -- what exllamav2 would upload, dequantized as its reconstruct kernel does --------------------------


WIDTH_ORDER = (8, 6, 5, 4, 3, 2)


def reconstruct(upload: Upload) -> torch.Tensor:
    """fp16 ``W [K, N]`` as ``reconstruct_kernel`` writes it from the uploaded tensors.

    The kernel takes row widths from cumulative row counts per width (all 8-bit rows, then 6-bit, …),
    the scale group of each row from the group map, ``scale = fp16(fp16((nibble + 1)²) · q_scale_max)``,
    ``w = fp16(fp16(q − 2^(b−1)) · scale)``, and writes packed row ``k`` to row ``q_perm[k]`` (uint16).
    Codes are read from the on-disk bit stream (the shuffle at load only reorders them for the kernel).
    """
    groups = upload.q_groups.tolist()
    count = len(groups) // 2
    height = upload.q_group_map.numel() // 2
    rows_per_width = dict.fromkeys(WIDTH_ORDER, 0)
    row = 0
    for i in range(count):  # QMatrix's constructor
        bits = groups[2 * i]
        rows = (groups[2 * i + 3] - groups[2 * i + 1]) * 32 // bits if i < count - 1 else height - row
        rows_per_width[bits] += rows
        row += rows
    words = upload.q_weight.to(torch.int64) & 0xFFFFFFFF
    n = words.shape[1]
    codes, widths = [], []
    first_word = 0
    for bits in WIDTH_ORDER:
        rows = rows_per_width[bits]
        if not rows:
            continue
        segment = words[first_word:first_word + rows * bits // 32]
        code = torch.zeros(rows, n, dtype=torch.int64)
        for j in range(bits):  # bit j of row i's code is stream bit i·bits + j
            stream_bit = torch.arange(rows) * bits + j
            code |= ((segment[stream_bit // 32] >> (stream_bit % 32).unsqueeze(1)) & 1) << j
        codes.append(code)
        widths.append(torch.full((rows,), bits))
        first_word += rows * bits // 32
    assert first_word == words.shape[0], "q_groups do not cover q_weight"
    code = torch.cat(codes)
    zero = 1 << (torch.cat(widths) - 1)
    group = upload.q_group_map[0::2].to(torch.int64)
    column = torch.arange(n)
    nibble = (upload.q_scale.to(torch.int64)[group][:, column // 8] >> (4 * (column % 8))) & 15
    scale = ((nibble + 1) ** 2).to(torch.float16) * upload.q_scale_max[group].unsqueeze(1)
    values = (code - zero.unsqueeze(1)).to(torch.float16) * scale
    weight = torch.empty_like(values)
    weight[upload.q_perm.to(torch.int64) & 0xFFFF] = values
    return weight


@dataclass
class Exl2coreLinear:
    """One linear as exl2core reads it: the fp16 weight ``[out, in]`` its forward runs with, the bias,
    and the packed tensors of the file."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: dict[str, torch.Tensor]


def exl2core_linears(model_dir: Path) -> dict[str, Exl2coreLinear]:
    """Per linear key, what exl2core's forward uses for an EXL2 directory."""
    model = open_model(model_dir)
    found = {}
    for module in model.plan.modules:
        weights = model.weights_override(module) or {}
        for lin in module.linears:
            if lin.name in weights:
                packed = {s: model.source.tensor(f"{lin.key}.{s}") for s in QUANT_SUFFIXES}
                found[lin.key] = Exl2coreLinear(weights[lin.name], weights.get(lin.name + ".bias"), packed)
    return found


# -- running exllamav2 --------------------------------------------------------------------------------


@dataclass
class LoadedLinear:
    key: str
    in_features: int
    out_features: int
    has_bias: bool
    prescale: float
    upload: Upload | None  # None: loaded as an fp16 matrix


def leaf_modules(ex: Exllamav2, modules) -> list:
    """Modules without parts of their own, found through ``submodules`` and through attributes (a
    parallel decoder's shared norm is in no ``submodules`` list), each once."""
    leaves, seen, todo = [], set(), list(modules)
    while todo:
        module = todo.pop(0)
        if id(module) in seen:
            continue
        seen.add(id(module))
        values = [*vars(module).values(), getattr(module, "submodules", [])]
        children = [v for value in values for v in (value if isinstance(value, list) else [value])
                    if isinstance(v, ex.ExLlamaV2Module)]
        if children:
            todo += children
        else:
            leaves.append(module)
    return leaves


def load_with_exllamav2(ex: Exllamav2, model_dir: Path):
    """prepare(), ExLlamaV2(config) and every linear's load() (on the CPU); returns (config, linears)."""
    config = ex.ExLlamaV2Config(str(model_dir))  # the constructor runs prepare()
    model = ex.ExLlamaV2(config)
    loaded = []
    for module in leaf_modules(ex, model.modules):
        module.set_device_idx(-1)
        if not isinstance(module, ex.ExLlamaV2Linear):
            assert module.load_weight() is not None, f"exllamav2 finds no tensor for {module.key}"
            continue
        before = set(ex.extension.uploads)
        module.load(device_context=False)
        new = set(ex.extension.uploads) - before
        upload = ex.extension.uploads[new.pop()] if new else None
        prescale = module.prev_prescale if module.prev_prescale is not None else module.prescale
        loaded.append(LoadedLinear(module.key, module.in_features, module.out_features, module.has_bias,
                                   prescale, upload))
        module.unload()
    return config, loaded


def tensor_locations(model_dir: Path) -> dict[tuple[str, int], str]:
    """(file, offset of its data) → tensor name, from the safetensors headers of ``model_dir``."""
    found = {}
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                found[str(path.resolve()), 8 + length + info["data_offsets"][0]] = name
    return found


def packed_keys(model_dir: Path) -> set[str]:
    keys = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            keys |= {k[: -len(".q_weight")] for k in handle.keys() if k.endswith(".q_weight")}
    return keys


def source_settings(source: Path) -> dict[str, float]:
    """The language model's shape and RoPE base (none for learned positions) as transformers reads the
    source checkpoint."""
    from transformers import AutoConfig

    raw = json.loads((source / "config.json").read_text())
    if raw["architectures"][0] in REMOTE_ARCHITECTURES:  # transformers cannot read it: config.json as published
        return {"hidden_size": raw["hidden_size"], "num_hidden_layers": raw["num_hidden_layers"],
                "num_attention_heads": raw["num_attention_heads"],
                "num_key_value_heads": raw.get("num_key_value_heads") or raw["num_attention_heads"],
                "head_dim": raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
                "vocab_size": raw["vocab_size"]}
    text = AutoConfig.from_pretrained(source).get_text_config()
    settings = {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
                "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
                "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                "vocab_size": text.vocab_size}
    params = getattr(text, "rope_parameters", None)
    if params is None:
        return settings
    if all(isinstance(v, dict) for v in params.values()):
        params = params["full_attention"]
    return {**settings, "rotary_embedding_base": params["rope_theta"],
            "partial_rotary_factor": params.get("partial_rotary_factor", 1.0)}


def architecture(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["architectures"][0]


def assert_loads_alike(ex: Exllamav2, out: Path, source: Path, biased: tuple[str, ...] | None) -> int:
    """Every check of this module on one exl2core output; returns the number of EXL2 linears.

    ``source`` is the checkpoint whose shape exllamav2 must read; ``biased`` names the linears that carry
    a bias (None: whatever exllamav2's architecture expects, which ``load()`` asserts)."""
    arch = architecture(out)
    config = ex.ExLlamaV2Config(str(out))
    assert config.arch.arch_string == arch, f"exllamav2 does not recognise {arch}"
    expected = source_settings(source)
    assert {key: getattr(config, key) for key in expected} == expected, "exllamav2 reads another config"
    config, linears = load_with_exllamav2(ex, out)
    vision = tuple(p for p in (config.arch.vt_prefix, config.arch.mmp_prefix) if p)
    unread = {name for where, name in tensor_locations(out).items()
              if where not in ex.extension.reads and not name.startswith(vision)}
    assert not unread, f"exllamav2's language model reads none of {sorted(unread)}"

    exl2 = {lin.key for lin in linears if lin.upload is not None}
    assert exl2 == packed_keys(out), "exllamav2 took other linears as EXL2 than exl2core packed"
    assert {lin.key for lin in linears if lin.upload is None and not lin.key.endswith(ROUTER_SUFFIXES)} == set()
    assert any(lin.key.endswith("lm_head") for lin in linears if lin.upload is not None)
    for lin in linears:
        if lin.upload is not None:
            assert (lin.upload.bias is not None) == lin.has_bias, f"{lin.key}: bias"
            if biased is not None:
                assert lin.has_bias == (lin.key.rsplit(".", 1)[-1] in biased), f"{lin.key}: bias expected"

    ours = exl2core_linears(out)
    assert set(ours) == exl2, "exl2core's forward and exllamav2 read different linears"
    for lin in linears:
        if lin.upload is None:
            continue
        weight = reconstruct(lin.upload)
        assert weight.shape == (lin.in_features, lin.out_features), lin.key
        assert lin.upload.q_group_map.numel() // 2 == lin.in_features, f"{lin.key}: group map height"
        reference = ours[lin.key]
        rows = reference.weight.shape[0]
        theirs, padding = weight.T[:rows], weight.T[rows:]
        assert not padding.any(), f"{lin.key}: padded outputs are not zero"
        if lin.prescale == 1:
            assert torch.equal(theirs.view(torch.int16), reference.weight.half().view(torch.int16)), lin.key
        else:
            # the loader scales q_scale_max by prescale in fp16 (exl2-format §2.8), which exl2core's dequantize
            # models exactly; against the forward's weight times prescale that costs fp16 rounding only
            modelled = dequantize(reference.packed, lin.prescale)[:rows]
            assert torch.equal(theirs.view(torch.int16), modelled.view(torch.int16)), lin.key
            torch.testing.assert_close(theirs.float(), reference.weight.float() * lin.prescale, rtol=5e-3,
                                       atol=0)
        if reference.bias is not None:
            assert torch.equal(lin.upload.bias[:rows], reference.bias.half()), f"{lin.key}: bias"
    return len(exl2)


@pytest.mark.parametrize("case", CASES)
def test_exllamav2_loads_exl2core_output(exllamav2, converted, case):
    out = converted(case)
    if case == "gemma3_text":  # written as the VLM without a tower, which exllamav2 0.3.2 recognises
        assert architecture(out) == "Gemma3ForConditionalGeneration"
    assert assert_loads_alike(exllamav2, out, out.parent / "src", BIASED.get(case, ())) >= 8


#: An EXL2 directory exl2core wrote from a real model, checked as well when set (its config.json is the
#: source's plus ``quantization_config``, so it also gives the shape exllamav2 must read).
REAL_MODEL_ENV = "EXL2_LOADER_MODEL"


@pytest.mark.skipif(not os.environ.get(REAL_MODEL_ENV), reason=f"set {REAL_MODEL_ENV} to an exl2core output")
def test_exllamav2_loads_a_real_exl2core_output(exllamav2):
    out = Path(os.environ[REAL_MODEL_ENV])
    assert assert_loads_alike(exllamav2, out, out, None) > 0
