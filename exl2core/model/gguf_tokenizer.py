"""Rebuild a HuggingFace ``tokenizers`` tokenizer from a GGUF file's vocabulary.

Why: a GGUF carries its tokenizer as metadata only (``tokenizer.ggml.*``), and the HF directory the
importer writes must tokenize exactly as llama.cpp does with that metadata. Two tokenizer models exist:
byte-level BPE (``gpt2``: merges plus a pre-tokenizer regex named by ``tokenizer.ggml.pre``) and
SentencePiece (``llama``: scored pieces with byte fallback, used by Llama 2 and Gemma).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from exl2core.errors import Exl2Error

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), grouped by the `tokenizer.ggml.pre` names sharing one.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"gpt2", "mpt", "olmo", "jais", "trillion"}
_DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "dbrx", "smaug-bpe"}

#: SentencePiece's word-boundary marker, which stands for a space inside pieces.
_SPM_SPACE = "\u2581"

# llama.cpp's token types (gguf.TokenType), fixed by the GGUF format.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of ``tokenizer.ggml.model`` (``gpt2`` or ``llama``) from the GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return _byte_level_bpe(meta)
    if model == "llama":
        return _sentencepiece(meta)
    raise Exl2Error(f"GGUF tokenizer model '{model}' is not supported (only byte-level BPE 'gpt2' and "
                    "SentencePiece 'llama')")


def _token_types(meta: dict[str, Any], count: int) -> list[int]:
    return list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * count)


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


def _byte_level_bpe(meta: dict[str, Any]) -> Tokenizer:
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    if not pre:
        raise Exl2Error("GGUF lacks 'tokenizer.ggml.pre'; re-convert it with a recent llama.cpp")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = _token_types(meta, len(tokens))
    vocab: dict[str, int] = {}
    for index, piece in enumerate(tokens):
        vocab.setdefault(piece, index)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_and_user_tokens(tokenizer, tokens, types)
    tokenizer.post_processor = _template_processor(meta, tokens) or processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece(meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: spaces become ``▁``, then adjacent symbols are merged,
    highest-scoring result first; characters without a piece fall back to ``<0xNN>`` byte tokens.

    HF's BPE does the same given merges ranked by the score of the piece they produce, so every split
    of a normal piece into two normal pieces becomes a merge. Control and user-defined pieces are
    matched in the raw text before that, as llama.cpp's special-token partition does.
    """
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise Exl2Error("GGUF SentencePiece vocabulary lacks 'tokenizer.ggml.scores'")
    types = _token_types(meta, len(tokens))
    vocab: dict[str, int] = {}
    for index, piece in enumerate(tokens):
        vocab.setdefault(piece, index)
    normal = {piece for piece, kind in zip(tokens, types) if kind == _NORMAL}
    ranked = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[vocab[piece]]), vocab[piece], vocab[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SPM
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE),
                                                     normalizers.Replace(" ", _SPM_SPACE)])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    tokenizer.decoder = decoders.Sequence(steps)
    _add_special_and_user_tokens(tokenizer, tokens, types)
    template = _template_processor(meta, tokens)
    if template is not None:
        tokenizer.post_processor = template
    return tokenizer


def _add_special_and_user_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == _USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _template_processor(meta: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing | None:
    """BOS/EOS insertion as llama.cpp does it (``add_bos_token`` / ``add_eos_token``); None if neither."""
    prefix, suffix, specials = [], [], {}
    for flag, key, parts in (("add_bos_token", "bos", prefix), ("add_eos_token", "eos", suffix)):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if meta.get(f"tokenizer.ggml.{flag}") and token_id is not None:
            parts.append(tokens[int(token_id)])
            specials[tokens[int(token_id)]] = int(token_id)
    if not specials:
        return None
    single = " ".join([*prefix, "$A", *suffix])
    second = [*(f"{t}:1" for t in prefix), "$B:1", *(f"{t}:1" for t in suffix)]
    pair = " ".join([*prefix, "$A", *suffix, *second])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))


def tokenizer_config(meta: dict[str, Any], context: int) -> dict[str, Any]:
    """tokenizer_config.json: special-token names, BOS/EOS flags and the chat template if the GGUF has one."""
    tokens = meta["tokenizer.ggml.tokens"]
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
