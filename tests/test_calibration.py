"""Calibration rows from the built-in text mix and from parquet files."""

from __future__ import annotations

import re
import warnings
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from exl2core.errors import Exl2Error
from exl2core.pipeline.calibration import (
    DOMAIN_WEIGHTS,
    calibration_rows,
    describe_dataset,
    domain_row_counts,
)

DATA = Path(str(resources.files("exl2core").joinpath("data", "calibration")))
SPECIAL = "<|special|>"
MAX_FILE_BYTES = 600_000
# Greek, Cyrillic, Hebrew, Arabic, Indic, Thai, Japanese kana, CJK ideographs, Hangul
NON_LATIN = re.compile(r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u06ff\u0900-\u0dff\u0e00-\u0e7f"
                       r"\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def domain_text(domain: str) -> str:
    return "".join(f.read_text(encoding="utf-8") for f in sorted(DATA.glob(f"{domain}-*.txt")))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on the shipped texts: lossless, so rows decode back to their source."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    samples = [f.read_text(encoding="utf-8")[:20_000] for f in sorted(DATA.glob("*.txt"))]
    tok.train_from_iterator(samples, trainer)
    return tok


@pytest.fixture(scope="module")
def default_rows(tokenizer: Tokenizer) -> torch.Tensor:
    return calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 128, noise_rows=3)


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def reference_ids(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False).ids]


def assert_from_text(tokenizer: Tokenizer, ids: list[int], text: str) -> None:
    """The decoded ids occur in ``text`` (their ends may hold cut multi-byte characters)."""
    decoded = tokenizer.decode(ids)
    middle = decoded[8:-8]
    assert len(middle) > 10
    assert middle in text


def test_shape_dtype_and_noise_rows(tokenizer: Tokenizer, default_rows: torch.Tensor) -> None:
    assert default_rows.shape == (103, 128)
    assert default_rows.dtype == torch.int64
    assert (default_rows[100:] == -1).all()
    assert ((default_rows[:100] >= 0) & (default_rows[:100] < tokenizer.get_vocab_size())).all()


def test_same_seed_same_rows_other_seed_other_rows(tokenizer: Tokenizer, default_rows: torch.Tensor) -> None:
    vocab = tokenizer.get_vocab_size()
    assert torch.equal(calibration_rows(tokenizer, vocab, 100, 128, noise_rows=3), default_rows)
    other = calibration_rows(tokenizer, vocab, 100, 128, seed=1, noise_rows=3)
    counts = domain_row_counts(100)
    start = 0
    for domain, n in counts.items():
        assert not torch.equal(other[start:start + n], default_rows[start:start + n]), domain
        start += n


def test_domain_counts_cover_every_request() -> None:
    for rows in range(0, 300):
        counts = domain_row_counts(rows)
        assert sum(counts.values()) == rows
        assert counts["random"] <= 2
    counts = domain_row_counts(100)
    assert all(counts[d] > 0 for d in DOMAIN_WEIGHTS)
    assert counts["prose"] == max(counts.values())
    assert domain_row_counts(1) == {**{d: 0 for d in DOMAIN_WEIGHTS}, "prose": 1, "random": 0}


def _starts(counts: dict[str, int]) -> list[int]:
    starts, total = [], 0
    for n in counts.values():
        starts.append(total)
        total += n
    return starts


def test_every_domain_row_comes_from_its_domain_text(tokenizer: Tokenizer,
                                                     default_rows: torch.Tensor) -> None:
    counts = domain_row_counts(100)
    texts = {d: domain_text(d) for d in ("prose", "code", "technical", "multilingual", "dialogue")}
    decoded = {}
    for domain, start in zip(DOMAIN_WEIGHTS, _starts(counts)):
        rows = default_rows[start:start + counts[domain]].tolist()
        for row in rows:
            assert_from_text(tokenizer, row, texts[domain.removesuffix("-shuffled")])
        decoded[domain] = tokenizer.decode([t for row in rows for t in row])
    assert re.search(r"\b(def|func|fn|return|const)\b", decoded["code"])
    assert NON_LATIN.search(decoded["multilingual"])
    assert not NON_LATIN.search(decoded["prose"])


def test_shuffled_rows_are_chunks_of_multilingual_text(tokenizer: Tokenizer) -> None:
    counts = domain_row_counts(100)
    rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 384)
    start = _starts(counts)[list(counts).index("multilingual-shuffled")]
    text = domain_text("multilingual")
    for row in rows[start:start + counts["multilingual-shuffled"]].tolist():
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
        rows = calibration_rows(tokenizer, tokenizer.get_vocab_size(), 100, 6144)
    counts = domain_row_counts(100)
    dialogue_tokens = len(reference_ids(tokenizer, [domain_text("dialogue")]))
    assert counts["dialogue"] * 6144 > dialogue_tokens  # more rows asked than the text holds
    assert rows.shape == (100, 6144)
    start = _starts(counts)[list(counts).index("dialogue")]
    dialogue = rows[start:start + counts["dialogue"]]
    assert len({tuple(r) for r in dialogue.tolist()}) < counts["dialogue"]  # windows reused
    assert_from_text(tokenizer, dialogue[-1].tolist(), domain_text("dialogue"))


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
    assert {f.name.split("-")[0] for f in files} == {"prose", "code", "technical", "multilingual", "dialogue"}
    for f in files:
        size = f.stat().st_size
        assert size <= MAX_FILE_BYTES, f.name
        assert f"| `{f.name}` | {size} |" in sources, f"{f.name} missing from SOURCES.md or size changed"
    assert 1_000_000 <= sum(f.stat().st_size for f in files) <= 2_000_000
