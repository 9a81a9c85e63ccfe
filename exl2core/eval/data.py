"""Evaluation text: a user's parquet or text file, or a built-in held-out domain, cut into token windows.

The built-in texts (``exl2core/data/eval``, see SOURCES.md there) share no document with the calibration
mix, so a quantized model is not scored on the text it was calibrated with. There is one per domain, so
quality claims cover more than one kind of text: technical documentation (the default), encyclopedic
prose, code, and chat conversations rendered with the model's own chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import torch

from exl2core.errors import Exl2Error
from exl2core.eval.chat_text import parse_conversations, render_conversations

DEFAULT_TEXT = "python-tutorial.txt"
DEFAULT_DATA_NAME = f"(built-in {DEFAULT_TEXT})"
PARQUET_SEPARATOR = "\n\n"

#: Built-in held-out domain → its file in exl2core/data/eval.
EVAL_DOMAINS: dict[str, str] = {
    "technical": DEFAULT_TEXT,
    "encyclopedic": "encyclopedic-original-articles.txt",
    "code": "code-python-stdlib.txt",
    "chat": "chat-original-conversations.txt",
}
DEFAULT_DOMAIN = "technical"
ALL_DOMAINS = "all"
CHAT_DOMAIN = "chat"


@dataclass(frozen=True)
class EvalText:
    """Text to score and its name in results. ``special_tokens``: special-token strings in it are the
    model's special tokens (chat-template markup), not plain text."""

    name: str
    text: str
    special_tokens: bool = False


def domain_names(selection: str) -> list[str]:
    """The built-in domains ``selection`` names: one of ``EVAL_DOMAINS`` or ``"all"``."""
    if selection == ALL_DOMAINS:
        return list(EVAL_DOMAINS)
    if selection not in EVAL_DOMAINS:
        raise Exl2Error(f"unknown evaluation domain '{selection}'; choose one of "
                        f"{', '.join(EVAL_DOMAINS)} or {ALL_DOMAINS}")
    return [selection]


def domain_text(domain: str, model_dir: str | Path | None = None) -> EvalText:
    """A built-in held-out domain's text. Chat conversations are rendered with ``model_dir``'s chat
    template, or as a plain transcript when it has none (or is None)."""
    (name,) = domain_names(domain)
    file = EVAL_DOMAINS[name]
    text = resources.files("exl2core").joinpath("data", "eval", file).read_text(encoding="utf-8")
    if name != CHAT_DOMAIN:
        return EvalText(f"(built-in {file})", text)
    rendered = render_conversations(parse_conversations(text, file), model_dir)
    how = "chat template" if rendered.templated else "transcript"
    return EvalText(f"(built-in {file}, {how})", "".join(rendered.texts), special_tokens=rendered.templated)


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
                  rows: int | None = None, *, special_tokens: bool = False) -> torch.Tensor:
    """Non-overlapping windows int64 ``[n, length]`` from the start of the tokenized text, at most
    ``rows`` of them (all that fit when None). No special tokens are added, as in exllamav2's eval;
    special-token strings in the text are plain text unless ``special_tokens``."""
    if length < 2:
        raise Exl2Error(f"evaluation windows need at least 2 tokens, got --length {length}")
    if rows is not None and rows < 1:
        raise Exl2Error(f"--rows must be at least 1, got {rows}")
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = not special_tokens
    try:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = before
    count = len(ids) // length if rows is None else min(rows, len(ids) // length)
    if count == 0:
        raise Exl2Error(f"the evaluation text is {len(ids)} tokens long, shorter than one window of "
                        f"{length}; use a smaller --length or more text")
    return torch.tensor(ids[:count * length], dtype=torch.int64).view(count, length)
