"""`exl2 eval` and `exl2 generate` against transformers, on FP16 and hand-made EXL2 directories."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.eval.data import load_text, token_windows
from exl2core.eval.generate import Sampling, TextStream, chat_template, generate_ids, render_chat, \
    stop_token_ids
from exl2core.eval.perplexity import evaluate
from exl2core.model.exl2_weights import Exl2Weights, is_exl2, open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import resolve_plan
from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.qparams import QParams

LENGTH = 32
ROWS = 3
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Random words of the tiny word-level vocabulary, enough for ROWS + 1 windows."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("eval_data") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(3, 300)}" for _ in range((ROWS + 1) * LENGTH)))
    return path


@pytest.fixture(scope="module")
def perturbed(tiny_llama, tmp_path_factory) -> Path:
    """A copy of the tiny Llama with one MLP matrix disturbed."""
    path = tmp_path_factory.mktemp("perturbed")
    shutil.copytree(tiny_llama.path, path, dirs_exist_ok=True)
    weights = load_file(path / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    noise = torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(1))
    weights[key] = weights[key] + 0.2 * noise
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def hf_perplexity(tiny, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = tiny.hf_logits(ids.unsqueeze(0))[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits.double(), ids[1:], reduction="sum").item()
        count += ids.numel() - 1
    return math.exp(nll / count)


def test_perplexity_equals_transformers(tiny_llama, text_file, capsys):
    code, out, _ = run_cli(capsys, "eval", str(tiny_llama.path), "--data", str(text_file),
                           "--length", str(LENGTH), "--rows", str(ROWS), "--device", "cpu", "--json")
    assert code == 0
    result = json.loads(out)
    windows = token_windows(SourceModel(tiny_llama.path).tokenizer, text_file.read_text(), LENGTH, ROWS)
    assert (result["windows"], result["length"], result["tokens"]) == (ROWS, LENGTH, ROWS * (LENGTH - 1))
    expected = hf_perplexity(tiny_llama, windows)
    assert abs(result["perplexity"] / expected - 1) <= 1e-3
    assert result["kl_divergence"] is None


def test_reference_against_itself_and_perturbed_copy(tiny_llama, perturbed, text_file):
    model = open_model(tiny_llama.path)
    windows = token_windows(model.source.tokenizer, text_file.read_text(), LENGTH, 2)
    same = evaluate(model, windows, open_model(tiny_llama.path))
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0
    assert same.ref_perplexity == pytest.approx(same.perplexity, rel=1e-9)

    other = evaluate(open_model(perturbed), windows, model)
    assert other.kl_divergence > 1e-3
    assert other.ref_perplexity == pytest.approx(same.perplexity, rel=1e-9)
    assert other.perplexity != pytest.approx(same.perplexity, rel=1e-4)


def test_table_output_and_parquet_data(tiny_llama, text_file, tmp_path, capsys):
    parquet = tmp_path / "words.parquet"
    words = text_file.read_text().split(" ")
    rows = [" ".join(words[i:i + 40]) for i in range(0, len(words), 40)]
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), parquet)
    assert load_text(parquet) == "\n\n".join(rows)
    code, out, _ = run_cli(capsys, "eval", str(tiny_llama.path), "--ref", str(tiny_llama.path), "--data",
                           str(parquet), "--length", str(LENGTH), "--rows", "1", "--device", "cpu")
    assert code == 0
    assert "perplexity" in out and "top-1 agreement" in out and "100.00 %" in out


def test_builtin_text_is_held_out():
    text = load_text()
    assert len(text) > 100_000
    calibration = Path(__file__).resolve().parents[1] / "exl2core" / "data" / "calibration"
    probes = [text[i:i + 300] for i in range(0, len(text), len(text) // 8)]
    for f in calibration.glob("*.txt"):
        body = f.read_text(encoding="utf-8")
        assert not any(p in body for p in probes), f.name


@pytest.mark.parametrize("argv, message", [
    (["eval", "{missing}"], "no such model directory"),
    (["eval", "{model}", "--data", "{missing}"], "does not exist"),
    (["eval", "{model}", "--data", "{no_text}"], "no 'text' column"),
    (["eval", "{model}", "--data", "{short}", "--length", "64"], "shorter than one window"),
    (["eval", "{model}", "--ref", "{missing}", "--data", "{short}"], "no such model directory"),
    (["generate", "-m", "{missing}", "-p", "w5"], "no such model directory"),
    (["generate", "-m", "{model}", "-p", "w5", "--chat"], "no chat template"),
    (["generate", "-m", "{model}", "-p", "w5", "--top-p", "0"], "--top-p"),
])
def test_user_errors(tiny_llama, tmp_path, capsys, argv, message):
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["w5 w6"]}), no_text)
    (tmp_path / "short.txt").write_text("w5 w6 w7")
    names = {"missing": str(tmp_path / "missing"), "model": str(tiny_llama.path), "no_text": str(no_text),
             "short": str(tmp_path / "short.txt")}
    code, _, err = run_cli(capsys, *(a.format(**names) for a in argv))
    assert code == 1
    assert err.startswith("error:") and message in err and "Traceback" not in err


# --- EXL2 directories -------------------------------------------------------------------------------

def write_exl2(source_dir: Path, target: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every linear of the plan (4 bits, groups of 32) into an EXL2 directory like the converter's:
    packed linears under ``Linear.key``, every other tensor fp16 under its source name. Returns, per
    module, the weights the quantizer itself reconstructs (its fake-quantized weight) as an override."""
    source = SourceModel(source_dir)
    plan = resolve_plan(source.config)
    qparams = QParams(32, [4], [1])
    tensors, expected = {}, {}
    for module in plan.modules:
        weights = {}
        for lin in module.linears:
            hessian = Hessian(lin.in_features)
            hessian.add(torch.randn(64, lin.in_features, generator=torch.Generator().manual_seed(7)))
            bias = source.tensor(lin.source + ".bias") if lin.bias else None
            q = quantize_linear(source.tensor(lin.source + ".weight"), hessian.prepare(lin.key), qparams,
                                bias=bias)
            tensors.update({f"{lin.key}.{suffix}": t for suffix, t in q.pack().items()})
            weights[lin.name] = q.weight[:lin.out_features]
            if bias is not None:
                weights[lin.name + ".bias"] = q.bias[:lin.out_features]
        for role, key in module.tensors.items():
            tensors[key] = source.tensor(key, dtype=torch.float16)
            weights[role] = tensors[key]
        expected[module.measurement_key] = weights
    target.mkdir(parents=True)
    save_file(tensors, target / "output.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source_dir / name, target / name)
    return expected


@pytest.mark.parametrize("tied", [False, True])
def test_exl2_directory_evaluates_with_dequantized_weights(tiny_model, tmp_path, text_file, capsys, tied):
    tiny = tiny_model("llama", tie_word_embeddings=tied, attention_bias=True)
    exl2_dir = tmp_path / "exl2"
    expected = write_exl2(tiny.path, exl2_dir)
    model = open_model(exl2_dir)
    assert is_exl2(model.source) and isinstance(model.weights_override, Exl2Weights)
    assert model.source.has("lm_head.q_weight") and not model.source.has("lm_head.weight")

    ids = tiny.random_ids(1, LENGTH)
    reference = forward_logits(SourceModel(tiny.path), model.plan, ids,
                               weights_override=lambda module: expected[module.measurement_key])
    torch.testing.assert_close(model.logits(ids), reference, rtol=0, atol=1e-5)
    assert not torch.allclose(reference, tiny.hf_logits(ids), atol=1e-3)  # it really is quantized
    cached = open_model(exl2_dir, cache=True)
    prompt = ids[0, :8].tolist()
    greedy = list(generate_ids(model, prompt, 4, Sampling()))
    assert list(generate_ids(cached, prompt, 4, Sampling())) == greedy

    code, out, _ = run_cli(capsys, "eval", str(exl2_dir), "--ref", str(tiny.path), "--data", str(text_file),
                           "--length", str(LENGTH), "--rows", "2", "--device", "cpu", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["kl_divergence"] > 0 and 0 < result["top1_agreement"] <= 1
    assert math.isfinite(result["perplexity"]) and result["perplexity"] != result["ref_perplexity"]


# --- generation -------------------------------------------------------------------------------------

def hf_greedy(tiny, prompt_ids: list[int], steps: int, eos: set[int]) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(steps):
        token = int(tiny.hf_logits(torch.tensor([ids]))[0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
    return ids[len(prompt_ids):]


def test_greedy_generation_equals_transformers(tiny_llama, capsys):
    model = open_model(tiny_llama.path)
    tokenizer = model.source.tokenizer
    prompt_ids = tokenizer.encode("w5 w7 w9").ids
    eos = stop_token_ids(tiny_llama.path, tokenizer)
    assert eos == {tiny_llama.hf.config.eos_token_id}
    expected = hf_greedy(tiny_llama, prompt_ids, 6, eos)
    assert list(generate_ids(model, prompt_ids, 6, Sampling(), eos)) == expected

    code, out, _ = run_cli(capsys, "generate", "-m", str(tiny_llama.path), "-p", "w5 w7 w9",
                           "--max-new-tokens", "6", "--device", "cpu")
    assert code == 0
    assert out == " " + tokenizer.decode(expected) + "\n"


def test_generation_stops_and_samples(tiny_llama):
    model = open_model(tiny_llama.path)
    prompt = [5, 7, 9]
    first = next(generate_ids(model, prompt, 1, Sampling()))
    assert list(generate_ids(model, prompt, 5, Sampling(), {first})) == []
    greedy = list(generate_ids(model, prompt, 3, Sampling()))
    assert list(generate_ids(model, prompt, 3, Sampling(temperature=0.7, top_k=1, seed=3))) == greedy
    assert list(generate_ids(model, prompt, 3, Sampling(temperature=0.7, top_p=1e-6, seed=3))) == greedy
    runs = [list(generate_ids(model, prompt, 4, Sampling(temperature=5.0, seed=s))) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_chat_template_rendering(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "chat"
    shutil.copytree(tiny_llama.path, model_dir)
    config = {"chat_template": "{{ bos_token }}" + CHATML, "bos_token": {"content": "<s>"},
              "eos_token": "</s>"}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert render_chat(model_dir, "hi") == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template(model_dir) == CHATML
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}"
                                                   "{% if add_generation_prompt %} w42{% endif %}")
    assert render_chat(model_dir, "w5 w7") == "w5 w7 w42"

    _, chat_out, _ = run_cli(capsys, "generate", "-m", str(model_dir), "-p", "w5 w7", "--chat",
                             "--max-new-tokens", "3", "--device", "cpu")
    _, plain_out, _ = run_cli(capsys, "generate", "-m", str(model_dir), "-p", "w5 w7 w42",
                              "--max-new-tokens", "3", "--device", "cpu")
    assert chat_out == plain_out and chat_out.strip()

    (model_dir / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(Exl2Error, match="only user turns"):
        render_chat(model_dir, "hi")


def test_text_stream_holds_back_partial_characters():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    prompt = tok.encode("Caf").ids
    new = tok.encode("é ✓").ids
    assert len(new) == 2 + 1 + 3
    stream = TextStream(tok, prompt)
    pieces = [stream.push(t) for t in new]
    assert pieces == ["", "é", " ", "", "", "✓"]
