"""Perplexity of a model on token windows and, against a reference model, KL divergence and top-1 agreement.

Windows run one at a time through the streaming forward, so only one window's logits (per model) and one
module's weights are ever on the device. Every window scores its positions ``0 … T−2`` (each predicting
the next token); KL and agreement are measured at the same positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.model.exl2_weights import InferenceModel

#: Positions whose log-softmax is taken at once: bounds the float32 temporaries for large vocabularies.
POSITION_CHUNK = 512


@dataclass
class WindowScore:
    """Sums over the scored positions of one or more windows."""

    positions: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    top1_matches: int = 0

    def add(self, other: "WindowScore") -> None:
        self.positions += other.positions
        self.nll += other.nll
        self.ref_nll += other.ref_nll
        self.kl += other.kl
        self.top1_matches += other.top1_matches


@dataclass
class EvalResult:
    """What ``exl2 eval`` reports; ``ref_*``, ``kl_divergence`` and ``top1_agreement`` need a reference."""

    model: str
    data: str
    windows: int
    length: int
    tokens: int
    perplexity: float
    ref: str | None = None
    ref_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def score_window(logits: torch.Tensor, ids: torch.Tensor,
                 ref_logits: torch.Tensor | None = None) -> WindowScore:
    """Score one window: ``logits``/``ref_logits`` ``[T, vocab]`` of the window ``ids`` ``[T]``.

    KL is ``KL(ref ‖ model) = Σ p_ref (log p_ref − log p_model)`` per position, in nats."""
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise Exl2Error(f"model and reference disagree on the logit shape ({tuple(logits.shape)[-1]} vs "
                        f"{tuple(ref_logits.shape)[-1]} vocabulary entries); they must share a tokenizer")
    targets = ids[1:].to(logits.device, torch.long)
    score = WindowScore(positions=targets.numel())
    for start in range(0, targets.numel(), POSITION_CHUNK):
        end = start + POSITION_CHUNK
        logprobs = torch.log_softmax(logits[start:end].float(), dim=-1)
        chunk_targets = targets[start:end].unsqueeze(-1)
        score.nll -= logprobs.gather(-1, chunk_targets).double().sum().item()
        if ref_logits is None:
            continue
        ref_logprobs = torch.log_softmax(ref_logits[start:end].float(), dim=-1)
        score.ref_nll -= ref_logprobs.gather(-1, chunk_targets).double().sum().item()
        kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
        score.kl += kl.double().sum().item()
        score.top1_matches += int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum().item())
    return score


def evaluate(model: InferenceModel, windows: torch.Tensor, ref: InferenceModel | None = None, *,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", data: str = "",
             on_window: Callable[[], None] | None = None) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` ``[n, T]`` (and the comparison with ``ref`` when given)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise Exl2Error("evaluation needs windows of at least 2 tokens")
    total = WindowScore()
    for ids in windows:
        logits = model.logits(ids, dtype, device)[0, :-1]
        ref_logits = ref.logits(ids, dtype, device)[0, :-1] if ref is not None else None
        total.add(score_window(logits, ids, ref_logits))
        del logits, ref_logits
        if on_window:
            on_window()
    n = total.positions
    result = EvalResult(model=str(model.path), data=data, windows=windows.shape[0], length=windows.shape[1],
                        tokens=n, perplexity=math.exp(total.nll / n))
    if ref is not None:
        result.ref = str(ref.path)
        result.ref_perplexity = math.exp(total.ref_nll / n)
        result.kl_divergence = total.kl / n
        result.top1_agreement = total.top1_matches / n
    return result


def result_table(result: EvalResult):
    """The result as a ``rich`` table: one row per measure."""
    from rich.table import Table

    table = Table(title=f"{result.windows} windows × {result.length} tokens of {result.data}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"perplexity ({result.model})", f"{result.perplexity:.4f}")
    if result.ref is not None:
        table.add_row(f"perplexity ({result.ref}, reference)", f"{result.ref_perplexity:.4f}")
        table.add_row("KL(reference ‖ model), nats/token", f"{result.kl_divergence:.6f}")
        table.add_row("top-1 agreement", f"{100 * result.top1_agreement:.2f} %")
    table.add_row("scored tokens", f"{result.tokens:,}")
    return table
