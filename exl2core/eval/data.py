"""Evaluation text: a user's parquet or text file, or the built-in held-out text, cut into token windows.

The built-in text (``exl2core/data/eval``, see SOURCES.md there) shares no document with the calibration
mix, so a quantized model is not scored on the text it was calibrated with.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import torch

from exl2core.errors import Exl2Error

DEFAULT_TEXT = "python-tutorial.txt"
DEFAULT_DATA_NAME = f"(built-in {DEFAULT_TEXT})"
PARQUET_SEPARATOR = "\n\n"


def load_text(path: str | Path | None = None) -> str:
    """The text of ``path``: a parquet file's ``text`` column joined by blank lines, any other file read
    whole as UTF-8; None is the built-in held-out text."""
    if path is None:
        return resources.files("exl2core").joinpath("data", "eval", DEFAULT_TEXT).read_text(encoding="utf-8")
    path = Path(path)
    if not path.is_file():
        raise Exl2Error(f"evaluation data {path} does not exist or is not a file")
    if path.suffix.lower() == ".parquet":
        return _parquet_text(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Exl2Error(f"evaluation data {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parquet_text(path: Path) -> str:
    try:
        columns = pq.read_schema(path).names
        if "text" not in columns:
            raise Exl2Error(f"evaluation data {path} has no 'text' column (columns: {', '.join(columns)})")
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise Exl2Error(f"cannot read evaluation data {path} as a parquet file: {e}") from None
    return PARQUET_SEPARATOR.join(str(v) for v in values if v is not None)


def token_windows(tokenizer: tokenizers.Tokenizer, text: str, length: int,
                  rows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows int64 ``[n, length]`` from the start of the tokenized text, at most
    ``rows`` of them (all that fit when None). No special tokens are added, as in exllamav2's eval."""
    if length < 2:
        raise Exl2Error(f"evaluation windows need at least 2 tokens, got --length {length}")
    if rows is not None and rows < 1:
        raise Exl2Error(f"--rows must be at least 1, got {rows}")
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # special-token strings in the text are plain text
    try:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = before
    count = len(ids) // length if rows is None else min(rows, len(ids) // length)
    if count == 0:
        raise Exl2Error(f"the evaluation text is {len(ids)} tokens long, shorter than one window of "
                        f"{length}; use a smaller --length or more text")
    return torch.tensor(ids[:count * length], dtype=torch.int64).view(count, length)
