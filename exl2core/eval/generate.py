"""Text generation for a quick look at a model: sampling, chat templates, stop tokens, streamed decoding.

There is no KV cache: every step runs the whole sequence through the streaming forward. That is slow
for long outputs but exact, and enough for the small models and short answers this is meant for.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import tokenizers
import torch

from exl2core.errors import Exl2Error
from exl2core.model.exl2_weights import InferenceModel

CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise Exl2Error(f"--temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise Exl2Error(f"--top-k must not be negative, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Exl2Error(f"--top-p must be in (0, 1], got {self.top_p}")


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one position's logits ``[vocab]``."""
    logits = logits.float()
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_ids(model: InferenceModel, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                 stop_ids: Collection[int] = (), *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Iterator[int]:
    """Yield new token ids one by one; a stop id ends generation without being yielded."""
    if not prompt_ids:
        raise Exl2Error("the prompt encodes to no tokens")
    if max_new_tokens < 0:
        raise Exl2Error(f"--max-new-tokens must not be negative, got {max_new_tokens}")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model.logits(torch.tensor(ids, dtype=torch.long), dtype, device)[0, -1]
        token = next_token(logits, sampling, generator)
        if token in stop_ids:
            return
        ids.append(token)
        yield token


class TextStream:
    """Incremental detokenization: ``push(id)`` returns the text the new token completes.

    The whole sequence is decoded each time (prompt included, so tokenizers that drop a leading space
    at the start of a text still print it) and only the new tail is returned; a tail ending in an
    incomplete UTF-8 sequence (U+FFFD) is held back until the following tokens complete it."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.printed = self._decode()

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Exl2Error(f"{path}: unreadable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def stop_token_ids(model_dir: str | Path, tokenizer: tokenizers.Tokenizer | None = None) -> set[int]:
    """EOS ids of config.json and generation_config.json, plus tokenizer_config.json's ``eos_token``."""
    path = Path(model_dir)
    config = _read_json(path / "config.json")
    ids = _ids(config.get("eos_token_id")) | _ids((config.get("text_config") or {}).get("eos_token_id"))
    ids |= _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
    eos = _token_text(_read_json(path / "tokenizer_config.json").get("eos_token"))
    if tokenizer is not None and eos is not None and tokenizer.token_to_id(eos) is not None:
        ids.add(tokenizer.token_to_id(eos))
    return ids


def find_chat_template(model_dir: str | Path) -> str | None:
    """The model's default chat template: chat_template.jinja, else tokenizer_config.json's entry; None
    when it has neither."""
    path = Path(model_dir)
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


def chat_template(model_dir: str | Path) -> str:
    """The model's default chat template (see ``find_chat_template``); an error when it has none."""
    template = find_chat_template(model_dir)
    if template is None:
        raise Exl2Error(f"{Path(model_dir)}: no chat template (neither {CHAT_TEMPLATE_FILE} nor a "
                        "'chat_template' in tokenizer_config.json); drop --chat")
    return template


def render_chat(model_dir: str | Path, prompt: str) -> str:
    """``prompt`` as one user message, rendered with the model's chat template and the generation prompt."""
    return render_messages(model_dir, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def render_messages(model_dir: str | Path, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
                    now: datetime | None = None) -> str:
    """``messages`` rendered with the model's chat template as transformers' ``apply_chat_template`` does.

    ``now`` fixes the date templates may print (``strftime_now``), so that a rendering can be repeated
    exactly; None is the current time.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise Exl2Error(f"chat template: {message}")

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                          sort_keys=sort_keys)

    tokenizer_config = _read_json(Path(model_dir) / "tokenizer_config.json")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: (now or datetime.now()).strftime(fmt))
    try:
        template = env.from_string(chat_template(model_dir))
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=_token_text(tokenizer_config.get("bos_token")) or "",
                               eos_token=_token_text(tokenizer_config.get("eos_token")) or "")
    except jinja2.TemplateError as e:
        raise Exl2Error(f"{model_dir}: cannot render the chat template ({e})") from None
