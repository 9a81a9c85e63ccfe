"""Versions of the built-in calibration mix against v1: the same conversion calibrated on each, scored
per domain.

    python bench/bench_calibration.py                                  # SmolLM2-135M, then Gemma-3-270M
    python bench/bench_calibration.py --models smollm2 --bits 4.0 --mixes v1 v2 v3 --work /tmp/calbench
    python bench/bench_calibration.py --models gemma3-270m --bits 4.0 --seeds 1 2 --work /tmp/calbench

For every model and mix: one measurement pass (``-om``, measurement rows × length; ``--measure`` as in
``exl2 convert``), then one quantization pass per bitrate reusing that measurement (``-m``), all other
settings exl2core's defaults, calibration rows drawn with each of ``--seeds`` (``exl2 convert --seed``: which
windows of each domain's text the rows take).
Each EXL2 model is scored against its FP16 source on the held-out domains of ``exl2 eval --domain``
(encyclopedic prose, code, chat rendered with the model's chat template): mean KL(FP16 ‖ EXL2) per
token, perplexity, top-1 agreement. The table gives each figure per mix side by side and each mix's KL
ratio to the first mix (v1 by default), and checks the targets of issue #19 for every later mix: ratio
≤ 0.85 on encyclopedic prose and chat, ≤ 1.05 everywhere; with several seeds, on the ratio of the KLs
averaged over them (each seed's rows listed above it). Finished steps are kept in WORK/results.json,
so rerunning the same command resumes; runs for different models may share WORK.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import MODELS  # noqa: E402

from exl2core.eval.data import domain_text, token_windows  # noqa: E402
from exl2core.eval.perplexity import evaluate  # noqa: E402
from exl2core.model.exl2_weights import open_model  # noqa: E402
from exl2core.pipeline.calibration_mix import DEFAULT_MIX, MIXES  # noqa: E402
from exl2core.pipeline.convert import Runtime, convert  # noqa: E402
from exl2core.pipeline.job import Settings  # noqa: E402

DOMAINS = ("encyclopedic", "code", "chat")
#: Issue #19: a new mix's KL at most this fraction of v1's on these domains …
IMPROVE_DOMAINS = {"encyclopedic": 0.85, "chat": 0.85}
#: … and no domain worse than this.
MAX_RATIO = 1.05


@dataclass
class Score:
    kl: float
    perplexity: float
    ref_perplexity: float
    top1: float
    windows: int


def measure(model_dir: Path, work: Path, mix: str, seed: int, args) -> Path:
    path = work / f"measurement-{mix}-{args.measure}{_seeded(seed)}.json"
    if not path.is_file():
        convert(Settings(in_dir=str(model_dir), cal_mix=mix, measure=args.measure, seed=seed,
                         measurement_rows=args.measurement_rows,
                         measurement_length=args.length, rows=args.rows, length=args.length,
                         output_measurement=str(path)),
                work / f"job-measure-{mix}{_seeded(seed)}", Runtime(quiet=True), restart=True)
    return path


def quantize(model_dir: Path, work: Path, mix: str, seed: int, bits: float, measurement: Path, args) -> Path:
    out = work / f"model-{mix}-{args.measure}-{bits}{_seeded(seed)}"
    if not (out / "config.json").is_file():
        convert(Settings(in_dir=str(model_dir), cal_mix=mix, measure=args.measure, bits=bits, seed=seed,
                         measurement=str(measurement),
                         measurement_rows=args.measurement_rows, measurement_length=args.length,
                         rows=args.rows, length=args.length, compile_full=str(out)),
                work / f"job-{mix}-{bits}{_seeded(seed)}", Runtime(quiet=True), restart=True)
    return out


def _seeded(seed: int) -> str:
    """The suffix of a seed's paths and result keys (none for seed 0, the converter's default)."""
    return f"-s{seed}" if seed else ""


def result_key(name: str, mode: str, mix: str, seed: int, bits: float, domain: str) -> str:
    return f"{name}/{mode}/{mix}{_seeded(seed)}/{bits}/{domain}"


def score(model_dir: Path, ref_dir: Path, domain: str, args) -> Score:
    model, ref = open_model(model_dir), open_model(ref_dir)
    text = domain_text(domain, ref_dir)
    windows = token_windows(ref.source.tokenizer, text.text, args.length, args.eval_rows,
                            special_tokens=text.special_tokens)
    result = evaluate(model, windows, ref, data=text.name)
    return Score(result.kl_divergence, result.perplexity, result.ref_perplexity, result.top1_agreement,
                 result.windows)


def table(results: dict, models: list[str], bits: list[float], mode: str, mixes: list[str],
          seeds: list[int]) -> tuple[list[str], list[str]]:
    """Markdown rows (KL, perplexity and top-1 per mix, each later mix's KL ratio to the first) per seed
    and, with several seeds, of their means; and the targets missed (on the means)."""
    base, others = mixes[0], mixes[1:]
    lines = ["| model | bpw | domain | seed | " + " | ".join(f"KL {m}" for m in mixes) + " | "
             + " | ".join(f"{m}/{base}" for m in others) + " | " + " | ".join(f"ppl {m}" for m in mixes)
             + " | ppl FP16 | " + " | ".join(f"top-1 {m}" for m in mixes) + " |"]
    lines.append("|" + "---|" * (4 + 3 * len(mixes) + len(others) + 1))
    missed = []

    def row(label: str, scores: list[dict]) -> list[float]:
        ratios = [s["kl"] / scores[0]["kl"] for s in scores[1:]]
        lines.append(f"| {name} | {b} | {domain} | {label} | " + " | ".join(f"{s['kl']:.4f}" for s in scores)
                     + " | " + " | ".join(f"{r:.3f}" for r in ratios) + " | "
                     + " | ".join(f"{s['perplexity']:.2f}" for s in scores)
                     + f" | {scores[0]['ref_perplexity']:.2f} | "
                     + " | ".join(f"{s['top1']:.3f}" for s in scores) + " |")
        return ratios

    for name in models:
        for b in bits:
            for domain in DOMAINS:
                per_seed = {seed: [results.get(result_key(name, mode, mix, seed, b, domain)) for mix in mixes]
                            for seed in seeds}
                per_seed = {seed: scores for seed, scores in per_seed.items() if None not in scores}
                if not per_seed:
                    continue
                for seed, scores in per_seed.items():
                    ratios = row(str(seed), scores)
                if len(per_seed) > 1:
                    ratios = row("mean", [{field: sum(s[i][field] for s in per_seed.values()) / len(per_seed)
                                           for field in ("kl", "perplexity", "ref_perplexity", "top1")}
                                          for i in range(len(mixes))])
                limit = IMPROVE_DOMAINS.get(domain, MAX_RATIO)
                for mix, ratio in zip(others, ratios):
                    if ratio > limit:
                        missed.append(f"{name} {b} bpw {domain}: {mix}/{base} KL {ratio:.3f} > {limit}")
    return lines, missed


def _read(results_path: Path) -> dict:
    return json.loads(results_path.read_text()) if results_path.is_file() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bits", type=float, nargs="+", default=[3.0, 4.0])
    parser.add_argument("--measurement-rows", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16, help="quantization rows")
    parser.add_argument("--length", type=int, default=512, help="tokens per calibration row and eval window")
    parser.add_argument("--eval-rows", type=int, default=8, help="evaluation windows per domain (at most)")
    parser.add_argument("--measure", default="fast", help="measurement mode (exl2 convert --measure)")
    parser.add_argument("--mixes", nargs="+", default=["v1", DEFAULT_MIX], choices=list(MIXES),
                        help="mix versions, the first being the baseline (default: v1 and the default mix)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="calibration seeds, each a full set of runs (default 0; the table averages them)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exl2-bench-calibration"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    for name in args.models:
        model_dir = MODELS[name]()
        work = args.work / name
        for seed in args.seeds:  # every mix of one seed before the next, so a cut-short run still compares
            run_seed(name, model_dir, work, seed, args, results_path)
    lines, missed = table(_read(results_path), args.models, args.bits, args.measure, args.mixes, args.seeds)
    print("\n".join(lines))
    print("targets met" if not missed else "targets missed:\n  " + "\n  ".join(missed))
    return 0


def run_seed(name: str, model_dir: Path, work: Path, seed: int, args, results_path: Path) -> None:
    """Every mix's measurement and quantizations of one model with calibration seed ``seed``, scored."""
    measurements = {}
    for mix in args.mixes:
        started = time.monotonic()
        measurements[mix] = measure(model_dir, work, mix, seed, args)
        print(f"{name} {mix} seed {seed}: measurement {time.monotonic() - started:.0f} s", flush=True)
    for b in args.bits:  # every mix at one bitrate before the next
        for mix in args.mixes:
            started = time.monotonic()
            out = quantize(model_dir, work, mix, seed, b, measurements[mix], args)
            print(f"{name} {mix} seed {seed} {b} bpw: quantization {time.monotonic() - started:.0f} s", flush=True)
            for domain in DOMAINS:
                key = result_key(name, args.measure, mix, seed, b, domain)
                results = _read(results_path)  # runs for other models or seeds may share WORK (one per core)
                if key not in results:
                    scored = asdict(score(out, model_dir, domain, args))
                    results = _read(results_path) | {key: scored}
                    results_path.write_text(json.dumps(results, indent=1))
                print(f"  {domain}: {results[key]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
