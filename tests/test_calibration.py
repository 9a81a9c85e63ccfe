"""Calibration rows from the built-in text mix (its versions, chat rendering) and from parquet files."""

from __future__ import annotations

import json
import re
import warnings
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.eval.chat_text import Message, parse_conversations, render_conversations
from exl2core.eval.data import DEFAULT_DATA_NAME, domain_names, token_windows
from exl2core.eval.data import domain_text as eval_domain_text
from exl2core.pipeline.calibration import (
    CHAT_DOMAINS,
    calibration_rows,
    describe_dataset,
    domain_row_counts,
)
from exl2core.pipeline.calibration_mix import DEFAULT_MIX, MIXES
from exl2core.pipeline.job import JOB_FILE, Job, Settings

DATA = Path(str(resources.files("exl2core").joinpath("data", "calibration")))
EVAL_DATA = Path(str(resources.files("exl2core").joinpath("data", "eval")))
SPECIAL = "<|special|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}")
MAX_FILE_BYTES = 600_000
V1 = MIXES["v1"].quantization
V2 = MIXES["v2"].quantization
V3 = MIXES["v3"].quantization
V4 = MIXES["v4"].quantization
DEFAULT = MIXES[DEFAULT_MIX].quantization
# Every mix after v1 (whose measurement and quantization rows are the same).
LATER_MIXES = [v for v in MIXES if v != "v1"]
# Greek, Cyrillic, Hebrew, Arabic, Indic, Thai, Japanese kana, CJK ideographs, Hangul
NON_LATIN = re.compile(r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0900-\u0dff\u0e00-\u0e7f"
                       r"\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def domain_text(domain: str) -> str:
    return "".join(f.read_text(encoding="utf-8") for f in sorted(DATA.glob(f"{domain}-*.txt")))


def chat_texts(model_dir: Path | None, domain: str = "chat") -> list[str]:
    conversations = parse_conversations(domain_text(domain))
    return render_conversations(conversations, model_dir).texts


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on the shipped texts: lossless, so rows decode back to their source."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[SPECIAL, IM_START, IM_END],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    samples = [f.read_text(encoding="utf-8")[:20_000] for f in sorted(DATA.glob("*.txt"))]
    tok.train_from_iterator(samples, trainer)
    return tok


@pytest.fixture(scope="module")
def default_rows(tokenizer: Tokenizer) -> torch.Tensor:
    return calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 128, noise_rows=3)


@pytest.fixture
def chatml_model(tmp_path: Path) -> Path:
    """A model directory whose only content is a ChatML chat template (all calibration needs of it)."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return tmp_path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def reference_ids(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False).ids]


def assert_from_text(tokenizer: Tokenizer, ids: list[int], text: str) -> None:
    """The decoded ids occur in ``text`` (their ends may hold cut multi-byte characters)."""
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    middle = decoded[8:-8]
    assert len(middle) > 10
    assert middle in text


def _starts(counts: dict[str, int]) -> dict[str, int]:
    starts, total = {}, 0
    for domain, n in counts.items():
        starts[domain] = total
        total += n
    return starts


def domain_rows(rows: torch.Tensor, weights: dict[str, float], domain: str) -> torch.Tensor:
    counts = domain_row_counts(rows.shape[0], weights)
    start = _starts(counts)[domain]
    return rows[start:start + counts[domain]]


def test_shape_dtype_and_noise_rows(tokenizer: Tokenizer, default_rows: torch.Tensor) -> None:
    assert default_rows.shape == (103, 128)
    assert default_rows.dtype == torch.int64
    assert (default_rows[100:] == -1).all()
    assert ((default_rows[:100] >= 0) & (default_rows[:100] < tokenizer.get_vocab_size())).all()


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("purpose", ["measurement", "quantization"])
def test_same_seed_same_rows_other_seed_other_rows(tokenizer: Tokenizer, mix: str, purpose: str) -> None:
    vocab = tokenizer.get_vocab_size()
    rows = calibration_rows(tokenizer, vocab, 100, 128, mix=mix, purpose=purpose)
    assert torch.equal(calibration_rows(tokenizer, vocab, 100, 128, mix=mix, purpose=purpose), rows)
    other = calibration_rows(tokenizer, vocab, 100, 128, seed=1, mix=mix, purpose=purpose)
    for domain in list(MIXES[mix].weights(purpose)) + ["random"]:
        weights = MIXES[mix].weights(purpose)
        assert not torch.equal(domain_rows(other, weights, domain), domain_rows(rows, weights, domain)), domain


def test_default_mix_is_v4_and_mixes_differ(tokenizer: Tokenizer, default_rows: torch.Tensor) -> None:
    vocab = tokenizer.get_vocab_size()
    assert DEFAULT_MIX == "v4"
    assert torch.equal(calibration_rows(tokenizer, vocab, 100, 128, mix="v4", noise_rows=3), default_rows)
    for older in ("v1", "v2", "v3"):
        assert not torch.equal(calibration_rows(tokenizer, vocab, 100, 128, mix=older, noise_rows=3), default_rows)
    measurement = calibration_rows(tokenizer, vocab, 100, 128, purpose="measurement", noise_rows=3)
    assert not torch.equal(measurement, default_rows)
    with pytest.raises(Exl2Error, match="unknown calibration mix 'v9'.*v1, v2, v3, v4"):
        calibration_rows(tokenizer, vocab, 4, 16, mix="v9")


@pytest.mark.parametrize("weights", [V1] + [w for v in LATER_MIXES
                                            for w in (MIXES[v].quantization, MIXES[v].measurement)],
                         ids=["v1"] + [f"{v}{part}" for v in LATER_MIXES for part in ("", "-measurement")])
def test_domain_counts_cover_every_request(weights: dict[str, float]) -> None:
    for rows in range(0, 300):
        counts = domain_row_counts(rows, weights)
        assert sum(counts.values()) == rows
        assert counts["random"] <= 2
    counts = domain_row_counts(100, weights)
    assert all(counts[d] > 0 for d in weights)
    heaviest = max(weights, key=weights.get)
    assert counts[heaviest] == max(counts.values())
    assert domain_row_counts(1, weights) == {**{d: 0 for d in weights}, heaviest: 1, "random": 0}


def test_documented_proportions_match_the_mixes() -> None:
    """SOURCES.md's tables give each mix's fractions and the row counts of the default settings."""
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    for version, mix in MIXES.items():
        table = sources.split(f"| {version} domain | measurement | rows | quantization | rows |")[1]
        documented = {}
        for line in table.split("\n\n")[0].splitlines()[2:]:
            domain, m_weight, m_rows, q_weight, q_rows = [c.strip() for c in line.strip("|").split("|")]
            documented[domain] = (m_weight, int(m_rows), q_weight, int(q_rows))
        m_counts, q_counts = domain_row_counts(16, mix.measurement), domain_row_counts(100, mix.quantization)
        assert set(documented) == set(m_counts) | set(q_counts), version
        for domain, (m_weight, m_rows, q_weight, q_rows) in documented.items():
            assert (m_rows, q_rows) == (m_counts.get(domain, 0), q_counts.get(domain, 0)), (version, domain)
            if domain != "random":
                assert (float(m_weight), float(q_weight)) == (mix.measurement.get(domain, 0.0),
                                                              mix.quantization.get(domain, 0.0)), (version, domain)


def test_v2_gives_informational_prose_about_half_the_quantization_rows() -> None:
    counts = domain_row_counts(100, V2)
    informational = counts["encyclopedic"] + counts["web"] + counts["news"]
    assert 0.45 <= informational / (100 - counts["random"]) <= 0.55
    assert counts["chat"] >= counts["code"]


def test_v3_restores_v1s_share_of_code_adjacent_text_and_keeps_v2s_encyclopedic_and_chat_rows() -> None:
    """v2 cut code, the Python documentation and FAQ from 38 to 21 of 98 text rows; v3 gives them a third."""
    code_adjacent = ("code", "technical", "dialogue")
    v1, v2, v3 = (domain_row_counts(100, w) for w in (V1, V2, V3))
    assert sum(v3[d] for d in code_adjacent) >= 0.33 * 98 > sum(v2[d] for d in code_adjacent)
    assert (v3["encyclopedic"], v3["chat"]) == (v2["encyclopedic"], v2["chat"])
    assert v3["code"] > v1["code"]


def test_v4_moves_rows_to_encyclopedic_prose_and_chat_and_keeps_code_adjacent_text() -> None:
    code_adjacent = ("code", "technical", "dialogue")
    for rows in (16, 100):
        v3, v4 = domain_row_counts(rows, V3), domain_row_counts(rows, V4)
        assert v4["encyclopedic"] + v4["chat"] > v3["encyclopedic"] + v3["chat"], rows
        assert sum(v4[d] for d in code_adjacent) >= sum(v3[d] for d in code_adjacent), rows
        assert v4["code"] >= v3["code"], rows


@pytest.mark.parametrize("mix", list(MIXES))
def test_every_domain_row_comes_from_its_domain_text(tokenizer: Tokenizer, mix: str) -> None:
    weights = MIXES[mix].quantization
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 128, mix=mix)
    texts = {d: domain_text(d) for d in weights if d not in ("multilingual-shuffled", *CHAT_DOMAINS)}
    texts["multilingual-shuffled"] = texts["multilingual"]
    texts |= {d: "".join(chat_texts(None, d)) for d in CHAT_DOMAINS}
    decoded = {}
    for domain in weights:
        part = domain_rows(rows, weights, domain).tolist()
        for row in part:
            assert_from_text(tokenizer, row, texts[domain])
        decoded[domain] = tokenizer.decode([t for row in part for t in row])
    assert re.search(r"\b(def|func|fn|return|const)\b", decoded["code"])
    assert NON_LATIN.search(decoded["multilingual"])
    assert not NON_LATIN.search(decoded["prose"])


def test_v1_never_reads_the_v2_files(tokenizer: Tokenizer) -> None:
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 128, mix="v1")
    v2_text = "".join(domain_text(d) for d in ("encyclopedic", "web", "news", "chat"))
    for row in rows[:-2].tolist():
        assert tokenizer.decode(row)[8:-8] not in v2_text


def test_chat_rows_use_the_model_template_and_its_special_tokens(tokenizer: Tokenizer,
                                                                 chatml_model: Path) -> None:
    vocab = tokenizer.get_vocab_size()
    start_id = tokenizer.token_to_id(IM_START)
    rows = calibration_rows(tokenizer, vocab, 100, 128, model_dir=chatml_model)
    chat = domain_rows(rows, DEFAULT, "chat")
    rendered = "".join(chat_texts(chatml_model))
    assert rendered.startswith(f"{IM_START}user\n")
    for row in chat.tolist():
        assert_from_text(tokenizer, row, rendered)
    assert (chat == start_id).sum() >= chat.shape[0]  # markup tokenized as the special tokens themselves
    others = torch.cat([domain_rows(rows, DEFAULT, d) for d in DEFAULT if d != "chat"])
    assert start_id not in others.flatten().tolist()
    # Only the chat rows depend on the template.
    plain = calibration_rows(tokenizer, vocab, 100, 128)
    assert torch.equal(others, torch.cat([domain_rows(plain, DEFAULT, d) for d in DEFAULT if d != "chat"]))
    assert not torch.equal(chat, domain_rows(plain, DEFAULT, "chat"))


def test_v6_renders_both_conversation_domains_with_the_template(tokenizer: Tokenizer,
                                                               chatml_model: Path) -> None:
    """The ``assistant`` conversations go through the chat template like ``chat``, each from its own file."""
    weights = MIXES["v6"].quantization
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 128, mix="v6", model_dir=chatml_model)
    start_id = tokenizer.token_to_id(IM_START)
    for domain, other in (("chat", "assistant"), ("assistant", "chat")):
        part = domain_rows(rows, weights, domain)
        rendered, other_text = "".join(chat_texts(chatml_model, domain)), "".join(chat_texts(chatml_model, other))
        for row in part.tolist():
            assert_from_text(tokenizer, row, rendered)
            assert tokenizer.decode(row, skip_special_tokens=False)[8:-8] not in other_text
        assert (part == start_id).sum() >= part.shape[0]


def test_chat_rows_fall_back_to_a_transcript_without_a_template(tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    vocab = tokenizer.get_vocab_size()
    rows = calibration_rows(tokenizer, vocab, 100, 128, model_dir=tmp_path)
    assert torch.equal(rows, calibration_rows(tokenizer, vocab, 100, 128, model_dir=None))
    chat = domain_rows(rows, DEFAULT, "chat")
    transcript = "".join(chat_texts(None))
    assert transcript.startswith("User: ")
    assert "\n\nAssistant: " in transcript
    for row in chat.tolist():
        assert_from_text(tokenizer, row, transcript)
    assert tokenizer.token_to_id(IM_START) not in chat.flatten().tolist()


def test_templates_that_reject_system_messages_get_it_in_the_first_user_message(tmp_path: Path) -> None:
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}" + CHATML)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    conversations = parse_conversations("header\n---\n[system]\nBe brief.\n[user]\nHi?\n[assistant]\nHello.\n")
    assert render_conversations(conversations, tmp_path).texts == [
        f"{IM_START}user\nBe brief.\n\nHi?{IM_END}\n{IM_START}assistant\nHello.{IM_END}\n"]


def test_conversation_file_format_errors() -> None:
    text = "header\n---\n[user]\na\n\nb\n[assistant]\nc\n---\n[system]\ns\n[user]\nd\n"
    assert parse_conversations(text) == [[Message("user", "a\n\nb"), Message("assistant", "c")],
                                         [Message("system", "s"), Message("user", "d")]]
    with pytest.raises(Exl2Error, match="must start with a \\[system\\] or \\[user\\]"):
        parse_conversations("x\n---\n[assistant]\nhi\n")
    with pytest.raises(Exl2Error, match="text before its first role line"):
        parse_conversations("x\n---\nstray\n[user]\nhi\n")
    with pytest.raises(Exl2Error, match="no conversations"):
        parse_conversations("only a header\n")


def test_shuffled_rows_are_chunks_of_multilingual_text(tokenizer: Tokenizer) -> None:
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 384)
    text = domain_text("multilingual")
    for row in domain_rows(rows, DEFAULT, "multilingual-shuffled").tolist():
        chunks = [row[i:i + 128] for i in range(0, 384, 128)]
        for chunk in chunks:
            assert_from_text(tokenizer, chunk, text)
        assert tokenizer.decode(row)[8:-8] not in text  # not one contiguous window


def test_random_rows_are_seeded_and_in_vocab(tokenizer: Tokenizer) -> None:
    a = calibration_rows(tokenizer, 50, 16, 32)[-2:]
    b = calibration_rows(tokenizer, 50, 16, 32)[-2:]
    c = calibration_rows(tokenizer, 50, 16, 32, seed=7)[-2:]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 50
    assert len(a.unique()) > 25  # spread over the whole range, not text


def test_wraps_around_when_a_domain_runs_out(tokenizer: Tokenizer) -> None:
    with pytest.warns(UserWarning, match="longer than"):
        rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 6144, mix="v1")
    counts = domain_row_counts(100, V1)
    dialogue_tokens = len(reference_ids(tokenizer, [domain_text("dialogue")]))
    assert counts["dialogue"] * 6144 > dialogue_tokens  # more rows asked than the text holds
    assert rows.shape == (100, 6144)
    dialogue = domain_rows(rows, V1, "dialogue")
    assert len({tuple(r) for r in dialogue.tolist()}) < counts["dialogue"]  # windows reused
    assert_from_text(tokenizer, dialogue[-1].tolist(), domain_text("dialogue"))


def _job(directory: Path, mix: str | None, progress: str) -> None:
    settings = Settings(in_dir="/models/m") if mix is None else Settings(in_dir="/models/m", cal_mix=mix)
    job = Job.open(directory, settings)
    job.advance(progress)


def test_a_job_resumes_only_with_its_mix(tmp_path: Path) -> None:
    _job(tmp_path, "v1", "measure")
    with pytest.raises(Exl2Error, match="cal_mix: 'v1' \\(job\\) vs 'v3' \\(now\\)"):
        Job.open(tmp_path, Settings(in_dir="/models/m", cal_mix="v3"))
    assert Job.open(tmp_path, Settings(in_dir="/models/m", cal_mix="v1")).settings.cal_mix == "v1"


def test_a_job_from_before_the_mix_setting_is_v1(tmp_path: Path) -> None:
    _job(tmp_path, None, "quant")
    saved = json.loads((tmp_path / JOB_FILE).read_text())
    assert saved["settings"].pop("cal_mix") == DEFAULT_MIX
    (tmp_path / JOB_FILE).write_text(json.dumps(saved))
    with pytest.raises(Exl2Error, match=f"cal_mix: 'v1' \\(job\\) vs '{DEFAULT_MIX}' \\(now\\)"):
        Job.open(tmp_path, Settings(in_dir="/models/m"))
    assert Job.open(tmp_path, Settings(in_dir="/models/m", cal_mix="v1")).settings.cal_mix == "v1"


def test_parquet_text_column(tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = [f"Row {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(40)]
    path = write_parquet(tmp_path / "cal.parquet", {"id": list(range(40)), "text": texts})
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 3, 50, dataset=path, noise_rows=1)
    expected = torch.tensor(reference_ids(tokenizer, texts)[:150]).reshape(3, 50)
    assert torch.equal(rows[:3], expected)
    assert (rows[3] == -1).all()


def test_parquet_without_text_column_joins_columns(tokenizer: Tokenizer, tmp_path: Path) -> None:
    nums, words = list(range(60)), [f"word{i} and more words" for i in range(60)]
    path = write_parquet(tmp_path / "cols.parquet", {"n": nums, "w": words})
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 2, 40, dataset=str(path))
    expected = reference_ids(tokenizer, [f"{n} {w}" for n, w in zip(nums, words)])[:80]
    assert rows.flatten().tolist() == expected


def test_parquet_special_token_strings_are_plain_text(tokenizer: Tokenizer, tmp_path: Path) -> None:
    special_id = tokenizer.token_to_id(SPECIAL)
    path = write_parquet(tmp_path / "sp.parquet", {"text": [f"a {SPECIAL} b " * 20]})
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 1, 30, dataset=path)
    assert special_id not in rows.flatten().tolist()
    assert SPECIAL in tokenizer.decode(rows[0].tolist())
    assert tokenizer.encode(SPECIAL, add_special_tokens=False).ids == [special_id]  # tokenizer restored


def test_parquet_too_little_data(tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = ["just a few words"] * 3
    path = write_parquet(tmp_path / "small.parquet", {"text": texts})
    found = len(reference_ids(tokenizer, texts))
    with pytest.raises(Exl2Error, match=rf"holds {found} tokens.* need 1000"):
        calibration_rows(tokenizer, 100, 10, 100, dataset=path)


def test_missing_or_unreadable_dataset(tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(Exl2Error, match="does not exist"):
        calibration_rows(tokenizer, 100, 1, 10, dataset=tmp_path / "absent.parquet")
    with pytest.raises(Exl2Error, match="does not exist"):
        calibration_rows(tokenizer, 100, 1, 10, dataset=tmp_path)
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("this is not parquet\n" * 10)
    with pytest.raises(Exl2Error, match="as a parquet file"):
        calibration_rows(tokenizer, 100, 1, 10, dataset=bogus)


def test_long_rows_warn_once(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "long.parquet", {"text": ["some text to repeat. " * 3000]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 2, 3000, dataset=path)
    assert rows.shape == (2, 3000)
    assert len([w for w in caught if "3000 tokens" in str(w.message)]) == 1


def test_bad_sizes_are_user_errors(tokenizer: Tokenizer) -> None:
    for args in [(0, 1, 1), (10, -1, 1), (10, 1, 0)]:
        with pytest.raises(Exl2Error):
            calibration_rows(tokenizer, *args)


def test_describe_dataset() -> None:
    assert describe_dataset(None) == "(default)"
    assert describe_dataset("/data/sets/wikitext.parquet") == "wikitext.parquet"
    assert describe_dataset(Path("c4.parquet")) == "c4.parquet"


def test_shipped_files_are_documented_and_small() -> None:
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    files = sorted(DATA.glob("*.txt"))
    domains = {d.removesuffix("-shuffled") for mix in MIXES.values() for d in mix.quantization}
    assert {f.name.split("-")[0] for f in files} == domains
    for f in files:
        size = f.stat().st_size
        assert size <= MAX_FILE_BYTES, f.name
        assert f"| `{f.name}` | {size} |" in sources, f"{f.name} missing from SOURCES.md or size changed"
    assert 1_000_000 <= sum(f.stat().st_size for f in files) <= 2_000_000


def test_eval_files_are_documented() -> None:
    sources = (EVAL_DATA / "SOURCES.md").read_text(encoding="utf-8")
    for f in sorted(EVAL_DATA.glob("*.txt")):
        assert re.search(rf"\| `{re.escape(f.name)}`[^|]*\| {f.stat().st_size} \|", sources), f.name


@pytest.mark.parametrize("name", ["encyclopedic-original-articles.txt", "code-python-stdlib.txt",
                                  "chat-original-conversations.txt"])
def test_held_out_domains_share_no_paragraph_or_line_with_calibration(name: str) -> None:
    """Lines shorter than 30 characters (``else:``, ``if __name__ == "__main__":``) are idiom, not text."""
    calibration = "".join(f.read_text(encoding="utf-8") for f in sorted(DATA.glob("*.txt")))
    held_out = (EVAL_DATA / name).read_text(encoding="utf-8")
    paragraphs = {p.strip() for p in calibration.split("\n\n")}
    lines = {line.strip() for line in calibration.splitlines()}
    shared = [p for p in held_out.split("\n\n") if len(p.strip()) >= 30 and p.strip() in paragraphs]
    shared += [line for line in held_out.splitlines() if len(line.strip()) >= 30 and line.strip() in lines]
    assert shared == []


def test_eval_domains_and_chat_rendering(tokenizer: Tokenizer, chatml_model: Path) -> None:
    assert domain_names("all") == ["technical", "encyclopedic", "code", "chat"]
    with pytest.raises(Exl2Error, match="unknown evaluation domain 'wiki'"):
        domain_names("wiki")
    assert eval_domain_text("technical").name == DEFAULT_DATA_NAME
    templated = eval_domain_text("chat", chatml_model)
    assert templated.special_tokens and templated.text.startswith(f"{IM_START}user\n")
    plain = eval_domain_text("chat", None)
    assert not plain.special_tokens and plain.text.startswith("User: ") and IM_START not in plain.text
    start_id = tokenizer.token_to_id(IM_START)
    as_special = token_windows(tokenizer, templated.text, 64, special_tokens=True)
    as_text = token_windows(tokenizer, templated.text, 64)
    assert (as_special == start_id).sum() > 5
    assert start_id not in as_text.flatten().tolist()


def test_cli_eval_every_domain(tiny_llama, capsys) -> None:
    assert main(["eval", str(tiny_llama.path), "--ref", str(tiny_llama.path), "--domain", "all",
                 "--length", "32", "--rows", "1", "--device", "cpu", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["data"] for r in results] == [
        "(built-in python-tutorial.txt)", "(built-in encyclopedic-original-articles.txt)",
        "(built-in code-python-stdlib.txt)", "(built-in chat-original-conversations.txt, transcript)"]
    assert all(r["kl_divergence"] == pytest.approx(0, abs=1e-6) and r["windows"] == 1 for r in results)
    assert main(["eval", str(tiny_llama.path), "--domain", "code", "--data", "x.txt"]) == 1
    assert "--data and --domain" in capsys.readouterr().err
