"""Calibration token rows: the built-in text mix or a user's parquet file (exl2-format §10).

The built-in mix is our own redistributable stand-in for exllamav2's standard calibration set: text files
in ``exl2core/data/calibration`` whose name prefix says their domain (see SOURCES.md there). Rows are drawn
from each domain in fixed proportions (a versioned mix, ``calibration_mix``) so that no single kind of
text dominates the Hessians.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import torch

from exl2core.errors import Exl2Error
from exl2core.eval.chat_text import parse_conversations, render_conversations
from exl2core.pipeline.calibration_mix import DEFAULT_MIX, MIXES, CalibrationMix, RowPurpose

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEFAULT_DATASET_NAME = "(default)"

# Row lengths above this are longer than exllamav2 ever calibrates with (it clamps to 2048, exl2-format §10.1).
LONG_ROW_WARNING = 2048

# Domains of conversations, rendered with the model's chat template (plain transcripts without one).
CHAT_DOMAINS = ("chat", "assistant")

SHUFFLED_FROM = {"multilingual-shuffled": "multilingual"}

# Shuffled rows are built from chunks this many tokens long, like exllamav2's shuffled multilingual row.
SHUFFLE_CHUNK_TOKENS = 128

# Rows of uniformly random token ids: one per this many requested rows, at most RANDOM_ROWS_MAX.
RANDOM_ROW_EVERY = 8
RANDOM_ROWS_MAX = 2

NOISE_ID = -1  # noise rows: replaced by Gaussian noise at embedding time (exl2-format §10.3)

PARQUET_BATCH_ROWS = 64


def calibration_rows(
    tokenizer: tokenizers.Tokenizer,
    vocab_size: int,
    rows: int,
    length: int,
    *,
    dataset: str | Path | None = None,
    seed: int = 0,
    noise_rows: int = 0,
    mix: str = DEFAULT_MIX,
    purpose: RowPurpose = "quantization",
    model_dir: str | Path | None = None,
) -> torch.Tensor:
    """Token ids int64 ``[rows + noise_rows, length]`` for calibration; noise rows (last) are all −1.

    ``dataset`` None uses version ``mix`` of the built-in mix with its proportions for ``purpose``;
    otherwise it is a parquet file read as in exl2-format §10.2. Text is tokenized without added special tokens,
    and special-token strings in it count as plain text, except in chat text rendered with the chat
    template of ``model_dir`` (a plain transcript when it has none or is None). Built-in rows come grouped
    by domain in the mix's order, then the random-token rows. The same arguments always give the same
    tensor.
    """
    _check_sizes(vocab_size, rows, length, noise_rows)
    if length > LONG_ROW_WARNING:
        warnings.warn(
            f"calibration rows of {length} tokens are longer than the {LONG_ROW_WARNING} exllamav2 uses; "
            "this costs memory and time for little gain",
            stacklevel=2,
        )
    with _special_tokens_as_text(tokenizer):
        if dataset is None:
            weights = calibration_mix(mix).weights(purpose)
            text_rows = _default_rows(tokenizer, vocab_size, rows, length, seed, weights, model_dir)
        else:
            text_rows = _parquet_rows(tokenizer, Path(dataset), rows, length)
    noise = torch.full((noise_rows, length), NOISE_ID, dtype=torch.int64)
    return torch.cat([text_rows, noise])


def calibration_mix(version: str) -> CalibrationMix:
    """The built-in mix of that version; an error naming the versions there are."""
    if version not in MIXES:
        raise Exl2Error(f"unknown calibration mix '{version}'; choose one of {', '.join(MIXES)}")
    return MIXES[version]


def describe_dataset(dataset: str | Path | None) -> str:
    """How the dataset is named in config.json's quantization_config."""
    return DEFAULT_DATASET_NAME if dataset is None else Path(dataset).name


def domain_row_counts(rows: int, weights: dict[str, float]) -> dict[str, int]:
    """Rows per domain of a mix's ``weights`` (``"random"`` included), summing to ``rows``.

    Largest-remainder allocation, so small requests still go to the most important domains first.
    """
    random_rows = min(RANDOM_ROWS_MAX, rows // RANDOM_ROW_EVERY)
    text_rows = rows - random_rows
    total = sum(weights.values())
    quotas = {d: text_rows * w / total for d, w in weights.items()}
    counts = {d: math.floor(q) for d, q in quotas.items()}
    by_remainder = sorted(weights, key=lambda d: (-(quotas[d] - counts[d]), -weights[d]))
    for d in by_remainder[: text_rows - sum(counts.values())]:
        counts[d] += 1
    counts["random"] = random_rows
    return counts


def _check_sizes(vocab_size: int, rows: int, length: int, noise_rows: int) -> None:
    if vocab_size < 1:
        raise Exl2Error(f"vocabulary size must be positive, got {vocab_size}")
    if rows < 0 or noise_rows < 0:
        raise Exl2Error(f"calibration row counts must not be negative (rows={rows}, noise rows={noise_rows})")
    if length < 1:
        raise Exl2Error(f"calibration row length must be at least 1 token, got {length}")


@contextmanager
def _special_tokens_as_text(tokenizer: tokenizers.Tokenizer) -> Iterator[None]:
    """Encode special-token strings found in the text as ordinary text, as exllamav2 does (exl2-format §10.1)."""
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        yield
    finally:
        tokenizer.encode_special_tokens = before


def _default_rows(tokenizer: tokenizers.Tokenizer, vocab_size: int, rows: int, length: int, seed: int,
                  weights: dict[str, float], model_dir: str | Path | None) -> torch.Tensor:
    counts = domain_row_counts(rows, weights)
    streams: dict[str, list[int]] = {}
    parts: list[torch.Tensor] = []
    for domain in weights:
        if counts[domain] == 0:
            continue
        source = SHUFFLED_FROM.get(domain, domain)
        if source not in streams:
            streams[source] = (_chat_tokens(tokenizer, source, model_dir) if source in CHAT_DOMAINS
                               else _domain_tokens(tokenizer, source))
        rng = random.Random(f"{seed}:{domain}")
        if domain in SHUFFLED_FROM:
            parts.append(_shuffled_rows(streams[source], counts[domain], length, rng))
        else:
            parts.append(_window_rows(streams[source], counts[domain], length, rng))
    generator = torch.Generator().manual_seed(seed)
    parts.append(torch.randint(0, vocab_size, (counts["random"], length), generator=generator,
                               dtype=torch.int64))
    return torch.cat(parts)


def _domain_files(domain: str) -> list[Traversable]:
    """A domain's files in name order."""
    files = sorted((f for f in _default_files() if f.name.startswith(f"{domain}-")), key=lambda f: f.name)
    if not files:
        raise Exl2Error(f"the built-in calibration data has no '{domain}' files; the installation is broken")
    return files


def _domain_tokens(tokenizer: tokenizers.Tokenizer, domain: str) -> list[int]:
    """All of a domain's files tokenized in name order and concatenated."""
    texts = [f.read_text(encoding="utf-8") for f in _domain_files(domain)]
    return _joined_tokens(tokenizer, texts, domain)


def _chat_tokens(tokenizer: tokenizers.Tokenizer, domain: str, model_dir: str | Path | None) -> list[int]:
    """A conversation domain's conversations, each rendered as the model is prompted, tokenized and joined.

    Template markup is tokenized with its special tokens as such, since that is what the model sees.
    """
    conversations = [c for f in _domain_files(domain)
                     for c in parse_conversations(f.read_text(encoding="utf-8"), f.name)]
    rendered = render_conversations(conversations, model_dir)
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = not rendered.templated
    try:
        return _joined_tokens(tokenizer, rendered.texts, domain)
    finally:
        tokenizer.encode_special_tokens = before


def _joined_tokens(tokenizer: tokenizers.Tokenizer, texts: list[str], domain: str) -> list[int]:
    tokens = [t for enc in tokenizer.encode_batch(texts, add_special_tokens=False) for t in enc.ids]
    if not tokens:
        raise Exl2Error(f"the tokenizer turned the built-in '{domain}' calibration text into no tokens")
    return tokens


def _default_files() -> list[Traversable]:
    folder = resources.files("exl2core").joinpath("data", "calibration")
    return [f for f in folder.iterdir() if f.name.endswith(".txt")]


def _window_rows(stream: list[int], count: int, length: int, rng: random.Random) -> torch.Tensor:
    """``count`` distinct windows of the stream in random order; wraps around when the text runs out."""
    if len(stream) < length:
        stream = stream * math.ceil(length / len(stream))
    windows = len(stream) // length
    offset = rng.randrange(len(stream) - windows * length + 1)
    order: list[int] = []
    while len(order) < count:
        order.extend(rng.sample(range(windows), windows))
    rows = [stream[offset + w * length: offset + (w + 1) * length] for w in order[:count]]
    return torch.tensor(rows, dtype=torch.int64).reshape(count, length)


def _shuffled_rows(stream: list[int], count: int, length: int, rng: random.Random) -> torch.Tensor:
    """Rows made of randomly picked short chunks, so the model sees abrupt switches of language."""
    chunk = min(SHUFFLE_CHUNK_TOKENS, length)
    if len(stream) < chunk:
        stream = stream * math.ceil(chunk / len(stream))
    chunks = len(stream) // chunk
    rows = []
    for _ in range(count):
        picks = [rng.randrange(chunks) for _ in range(math.ceil(length / chunk))]
        row = [t for p in picks for t in stream[p * chunk: (p + 1) * chunk]]
        rows.append(row[:length])
    return torch.tensor(rows, dtype=torch.int64).reshape(count, length)


def _parquet_rows(tokenizer: tokenizers.Tokenizer, path: Path, rows: int, length: int) -> torch.Tensor:
    """Rows from a parquet file's ``text`` column (or all columns joined), in file order (exl2-format §10.2)."""
    if not path.is_file():
        raise Exl2Error(f"calibration dataset {path} does not exist or is not a file")
    needed = rows * length
    tokens: list[int] = []
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            if len(tokens) >= needed:
                break
            encodings = tokenizer.encode_batch(_batch_texts(batch), add_special_tokens=False)
            for enc in encodings:
                tokens.extend(enc.ids)
    except (pa.ArrowException, OSError) as e:
        raise Exl2Error(f"cannot read calibration dataset {path} as a parquet file: {e}") from e
    if len(tokens) < needed:
        raise Exl2Error(f"calibration dataset {path.name} holds {len(tokens)} tokens, "
                        f"but {rows} rows of {length} need {needed}")
    return torch.tensor(tokens[:needed], dtype=torch.int64).reshape(rows, length)


def _batch_texts(batch: pa.RecordBatch) -> list[str]:
    if "text" in batch.schema.names:
        return ["" if v is None else str(v) for v in batch.column("text").to_pylist()]
    columns = [c.to_pylist() for c in batch.columns]
    return [" ".join(str(v) for v in values) for values in zip(*columns)]
