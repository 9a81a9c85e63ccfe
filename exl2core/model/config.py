"""config.json normalisation.

Two styles exist in the wild: the classic one (``rope_theta``, ``rope_scaling`` at the top level)
and the one written by recent transformers (``rope_parameters``, a nested ``text_config`` for
multimodal checkpoints). ``ModelConfig`` reads both and exposes one set of names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exl2core.errors import Exl2Error


@dataclass(frozen=True)
class RopeSpec:
    """RoPE parameters: ``kind`` is default | linear | dynamic | llama3 | yarn | none."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    alpha: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_dict(cls, params: dict | None, theta: float, partial: float = 1.0,
                  original_max: int | None = None) -> "RopeSpec":
        params = dict(params or {})
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind == "dynamic" and "alpha" in params:
            kind = "ntk_alpha"
        return cls(
            theta=float(params.get("rope_theta", theta)),
            kind=kind,
            factor=float(params.get("factor", 1.0) or 1.0),
            alpha=float(params.get("alpha", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings", original_max),
            beta_fast=float(params.get("beta_fast", 32.0)),
            beta_slow=float(params.get("beta_slow", 1.0)),
            attention_factor=params.get("attention_factor"),
            partial_rotary_factor=float(params.get("partial_rotary_factor", partial)),
        )


@dataclass
class ModelConfig:
    """The fields of config.json the core needs, whatever style it was written in.

    ``text`` is the language model's view: top-level keys overlaid by ``text_config`` when present.
    Plugins read anything architecture-specific through :meth:`get`.
    """

    raw: dict[str, Any]
    text: dict[str, Any]
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_by_layer_type: dict[str, RopeSpec] = field(default_factory=dict)

    def get(self, *names: str, default: Any = None) -> Any:
        """First of ``names`` present in the text view (then the top level), else ``default``."""
        for name in names:
            if name in self.text and self.text[name] is not None:
                return self.text[name]
            if name in self.raw and self.raw[name] is not None:
                return self.raw[name]
        return default

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise Exl2Error("config.json must name exactly one entry in 'architectures'")
        text = dict(raw)
        if isinstance(raw.get("text_config"), dict):
            text.update(raw["text_config"])

        def need(*names: str) -> Any:
            for name in names:
                if text.get(name) is not None:
                    return text[name]
            raise Exl2Error(f"config.json lacks '{names[0]}'")

        hidden = int(need("hidden_size", "d_model", "n_embd"))
        heads = int(need("num_attention_heads", "n_heads", "n_head"))
        head_dim = int(text.get("head_dim") or hidden // heads)
        theta = float(text.get("rope_theta") or 10000.0)
        partial = float(text.get("partial_rotary_factor") or 1.0)
        max_pos = int(text.get("max_position_embeddings") or text.get("max_seq_len") or 2048)
        orig_max = text.get("original_max_position_embeddings")

        rope_by_type: dict[str, RopeSpec] = {}
        params = text.get("rope_parameters")
        if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
            rope_by_type = {k: RopeSpec.from_dict(v, theta, partial, orig_max) for k, v in params.items()}
            rope = rope_by_type.get("full_attention") or next(iter(rope_by_type.values()))
        elif isinstance(params, dict):
            rope = RopeSpec.from_dict(params, theta, partial, orig_max)
        else:
            rope = RopeSpec.from_dict(text.get("rope_scaling"), theta, partial, orig_max)

        vocab = text.get("vocab_size")
        return cls(
            raw=raw,
            text=text,
            architecture=archs[0],
            model_type=str(text.get("model_type", raw.get("model_type", ""))),
            hidden_size=hidden,
            num_layers=int(need("num_hidden_layers", "n_layers", "n_layer")),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
            vocab_size=int(vocab) if vocab else 0,
            norm_eps=float(text.get("rms_norm_eps") or text.get("layer_norm_eps")
                           or text.get("layer_norm_epsilon") or 1e-5),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_position_embeddings=max_pos,
            rope_by_layer_type=rope_by_type,
        )

    @classmethod
    def load(cls, model_dir: str | Path, defaults: Callable[[dict], dict] | None = None) -> "ModelConfig":
        """config.json of ``model_dir``, passed through ``defaults`` (the plugins' missing keys, see
        ``exl2core.plugins.load_config``) before it is read."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise Exl2Error(f"{model_dir}: no config.json (is this a HuggingFace model directory?)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise Exl2Error(f"{path}: unreadable config.json ({e})") from None
        if not isinstance(raw, dict):
            raise Exl2Error(f"{path}: config.json is not a JSON object")
        return cls.from_dict(defaults(raw) if defaults else raw)
