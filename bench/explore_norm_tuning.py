"""End-to-end tuning of a converted model's unquantized parameters against the FP16 model (explored for
issue #12, not in the converter).

    python bench/explore_norm_tuning.py FP16_DIR EXL2_DIR [--steps 48] [--lr 2e-3] [--rows 16]
        [--eval-rows 3] [--group-scales]

EXL2 keeps the norms' weights in fp16 and each group's ``q_scale_max`` as an fp16 multiplier, so both can
change without touching a code or a size (norm tweaking, Li et al., AAAI 2024; AQLM's fine-tuning of the
non-quantized parameters). This script holds the conversion's weights in memory, gives every norm weight (and, with
``--group-scales``, every group multiplier) a trainable relative change, and runs Adam on the KL of the
converted model's next-token distribution from the FP16 model's, one 512-token calibration row of the
built-in mix per step (the FP16 model's log-probabilities on those rows are computed once and kept). It
prints the held-out KL before and after, scored by ``exl2core.eval.perplexity.evaluate`` on windows of the
built-in evaluation text, as ``bench_quantizer.py whole`` scores a conversion.
"""

from __future__ import annotations

import argparse
import time

import torch

from exl2core.eval.data import load_text, token_windows
from exl2core.eval.perplexity import evaluate
from exl2core.model.exl2_weights import InferenceModel, open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import module_weights
from exl2core.modules.forward import module_forward
from exl2core.pipeline.calibration import calibration_rows
from exl2core.plan import EmbeddingModule
from exl2core.quant.pack import unpack_codes

ROW_LENGTH = 512


class Tunable:
    """One weight tensor of the converted model, rebuilt as ``base · (1 + δ[index])`` from a trainable
    relative change ``δ`` (per element for a norm, per input group of a quantized linear)."""

    def __init__(self, weights: dict[str, torch.Tensor], name: str, size: int, index: torch.Tensor | None):
        self.weights, self.name, self.index = weights, name, index
        self.base = weights[name].clone()
        self.delta = torch.zeros(size, requires_grad=True)

    def apply(self) -> None:
        if self.index is None:
            self.weights[self.name] = self.base * (1 + self.delta)
        else:
            self.weights[self.name] = self.base * (1 + self.delta[self.index])[None, :]


def group_index(source: SourceModel, key: str) -> tuple[int, torch.Tensor]:
    """The number of groups of a packed linear and each input feature's group."""
    _, _, rows = unpack_codes(source.tensor(key + ".q_weight"), source.tensor(key + ".q_groups"))
    perm = torch.argsort(source.tensor(key + ".q_invperm").long())
    permuted = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(list(rows)))
    index = torch.empty_like(permuted)
    index[perm] = permuted
    return len(rows), index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp16")
    ap.add_argument("exl2")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rows", type=int, default=16, help="calibration rows of 512 tokens, one per step in turn")
    ap.add_argument("--eval-rows", type=int, default=3, help="held-out windows of 2048 tokens")
    ap.add_argument("--group-scales", action="store_true", help="tune each group's multiplier as well")
    args = ap.parse_args()
    torch.manual_seed(0)
    ref, quant = open_model(args.fp16), open_model(args.exl2)
    modules = quant.plan.modules
    q_weights = [module_weights(quant.source, m, torch.float32, "cpu", quant.weights_override) for m in modules]
    forwards = [module_forward(m) for m in modules]
    tunables = []
    for module, weights in zip(modules, q_weights):
        if isinstance(module, EmbeddingModule):
            continue
        for role in module.tensors:
            if weights[role].dim() == 1:
                tunables.append(Tunable(weights, role, weights[role].numel(), None))
        for lin in module.linears if args.group_scales else ():
            if quant.source.has(lin.key + ".q_groups"):
                tunables.append(Tunable(weights, lin.name, *group_index(quant.source, lin.key)))
    print(f"{sum(t.delta.numel() for t in tunables)} tuned parameters", flush=True)

    def log_probs(ids: torch.Tensor) -> torch.Tensor:
        """The converted model's log-probabilities under autograd (the streaming forward runs in inference
        mode)."""
        x = ids
        for module, w, fwd in zip(modules, q_weights, forwards):
            x = fwd(module, w, x)
            if isinstance(module, EmbeddingModule) and quant.plan.fp32_residual:
                x = x.float()
        return torch.log_softmax(x.float(), -1)

    def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        return (teacher.exp() * (teacher - student)).sum(-1).mean()

    windows = token_windows(ref.source.tokenizer, load_text(), 2048, args.eval_rows)
    by_key = {m.measurement_key: w for m, w in zip(modules, q_weights)}
    tuned = InferenceModel(quant.source, quant.plan, lambda module: by_key[module.measurement_key])

    def held_out_kl() -> float:
        with torch.no_grad():
            for t in tunables:
                t.apply()
        return evaluate(tuned, windows, ref).kl_divergence

    cal = calibration_rows(quant.source.tokenizer, quant.plan.config.vocab_size, args.rows, ROW_LENGTH, seed=1)
    with torch.no_grad():
        teachers = [torch.log_softmax(ref.logits(row), -1) for row in cal]
    print(f"held-out KL before: {held_out_kl():.4f}", flush=True)
    optimizer = torch.optim.Adam([t.delta for t in tunables], lr=args.lr)
    start = time.monotonic()
    for step in range(args.steps):
        optimizer.zero_grad()
        for t in tunables:
            t.apply()
        row = step % args.rows
        loss = kl(teachers[row], log_probs(cal[row][None]))
        loss.backward()
        optimizer.step()
        if step % 8 == 0 or step == args.steps - 1:
            print(f"step {step}: calibration KL {loss.item():.4f} ({time.monotonic() - start:.0f} s)", flush=True)
    print(f"held-out KL after: {held_out_kl():.4f}", flush=True)


if __name__ == "__main__":
    main()
