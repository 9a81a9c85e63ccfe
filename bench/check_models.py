"""The benchmark models' FP16 imports against transformers: is each GGUF import a faithful model?

    python bench/check_models.py [smollm2 gemma3-270m] [--rows 4] [--length 512]

On windows of the held-out text (as ``exl2 eval`` cuts them: no special tokens), exl2core's forward and
transformers' (float32, eager attention) must give the same logits, and a perplexity well under 100 says
the weights, config and tokenizer fit together. Gemma is trained with ``<bos>`` in front of every
sequence, so the table also gives transformers' perplexity with ``<bos>`` put before each window (its
last token dropped to keep the length).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from models import MODELS
from exl2core.errors import Exl2Error
from exl2core.eval.data import load_text, token_windows
from exl2core.model.exl2_weights import open_model


@dataclass
class ModelCheck:
    name: str
    max_logit_diff: float
    top1_agreement: float
    perplexity: float  # exl2core's forward
    hf_perplexity: float  # transformers' forward, same windows
    hf_perplexity_bos: float | None  # transformers, <bos> before each window; None without a BOS token


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logprobs.gather(1, ids[1:, None].long()).sum().item()


def check_model(name: str, rows: int, length: int) -> ModelCheck:
    import transformers

    path = MODELS[name]()
    model = open_model(path, "cpu")
    windows = token_windows(model.source.tokenizer, load_text(None), length, rows)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    bos = hf.config.bos_token_id
    diff, agree, nll, hf_nll, bos_nll = 0.0, 0.0, 0.0, 0.0, 0.0
    for ids in windows:
        ours = model.logits(ids[None], torch.float32, torch.device("cpu"))[0].float()
        with torch.no_grad():
            ref = hf(ids[None].long()).logits[0].float()
            if bos is not None:
                with_bos = torch.cat([torch.tensor([bos]), ids[:-1]])
                bos_nll += _nll(hf(with_bos[None].long()).logits[0], with_bos)
        diff = max(diff, (ours - ref).abs().max().item())
        agree += (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        nll, hf_nll = nll + _nll(ours, ids), hf_nll + _nll(ref, ids)
    predicted = windows.shape[0] * (length - 1)
    return ModelCheck(name, diff, agree / windows.shape[0], math.exp(nll / predicted),
                      math.exp(hf_nll / predicted), math.exp(bos_nll / predicted) if bos is not None else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"{', '.join(MODELS)} (default: all)")
    parser.add_argument("--rows", type=int, default=4, help="evaluation windows (default 4)")
    parser.add_argument("--length", type=int, default=512, help="tokens per window (default 512)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    print(f"{args.rows} windows x {args.length} tokens of the built-in held-out text\n")
    print("| model | max abs logit diff, exl2core vs transformers | top-1 agreement | perplexity (exl2core) "
          "| perplexity (transformers) | perplexity, <bos> first (transformers) |")
    print("|---|---|---|---|---|---|")
    try:
        for name in args.names or MODELS:
            c = check_model(name, args.rows, args.length)
            bos = "—" if c.hf_perplexity_bos is None else f"{c.hf_perplexity_bos:.3f}"
            print(f"| {c.name} | {c.max_logit_diff:.2e} | {c.top1_agreement:.4f} | {c.perplexity:.3f} "
                  f"| {c.hf_perplexity:.3f} | {bos} |", flush=True)
    except Exl2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
