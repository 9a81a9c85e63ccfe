"""Does a slot's isolated-KL scale depend on the bitrate it is measured at, and does allocating with scales
measured at several bitrates beat the single one ``--sensitivity isolated`` measures?

    python bench/bench_reference_bpw.py [--model smollm2] [--refs 2.2 3.0 4.5] [--bits 2.5 4.0] [--work W]

1. One fast measurement of the model (``exl2 convert -om``, the demo's rows: 4 × 512 measurement,
   16 × 512 quantization; isolated sensitivity at ``marginal.REFERENCE_BPW``).
2. The isolated-KL pass again with the reference setting at each ``--refs`` bitrate, on the same tokens and
   Fisher sensitivity: per slot, the measured ÷ predicted KL at each bitrate, and the exponent β of
   ``KL ∝ predicted^β`` between the outer two (β = 1: one scale fits every bitrate).
3. Per ``--bits`` target, two quantizations from that measurement with the same rows: its own predicted KLs
   (one scale per slot), and the same predictions with each slot's scale interpolated linearly in
   log(predicted KL) between the ``--refs`` points (the end points' scale beyond them); each output scored
   on the held-out domains of ``exl2 eval --domain``.

Finished steps are kept in WORK (rerunning the same command resumes); the tables are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_calibration import DOMAINS, score  # noqa: E402
from models import MODELS  # noqa: E402

from exl2core.pipeline import marginal  # noqa: E402
from exl2core.pipeline.convert import Converter, Runtime, convert  # noqa: E402
from exl2core.pipeline.job import JOB_FILE, Job, Settings, load_tensors  # noqa: E402
from exl2core.pipeline.sensitivity import Sensitivity, sensitivity_rows  # noqa: E402

ROWS = dict(measurement_rows=4, measurement_length=512, rows=16, length=512)


def reference_kls(job_dir: Path, refs: list[float], path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{ref: {"predicted": {slot: KL}, "measured": {slot: KL}}}`` of the finished measurement job."""
    done = json.loads(path.read_text()) if path.is_file() else {}
    settings = Settings.from_saved(json.loads((job_dir / JOB_FILE).read_text())["settings"])
    converter = Converter(Job.prepare(job_dir, settings), Runtime(quiet=True))
    ids = sensitivity_rows(load_tensors(job_dir / "cal_data.safetensors")["input_ids"], converter.plan,
                           converter.dtype.itemsize)
    fisher = Sensitivity(Sensitivity.load(job_dir / "sensitivity.safetensors").grads)

    def weights_of(module):
        return converter.source.module_weights(module, converter.dtype, converter.device)

    for ref in refs:
        if str(ref) in done:
            continue
        marginal.REFERENCE_BPW = ref
        found = marginal.measure_marginals(converter.plan, weights_of, marginal.marginal_rows(ids),
                                           converter.device, fisher, mode="isolated",
                                           samples=settings.kl_samples, seed=settings.seed)
        done[str(ref)] = {"predicted": found.predicted, "measured": found.measured}
        path.write_text(json.dumps(done))
        print(f"isolated KL at {ref} bpw measured", flush=True)
    return {str(ref): done[str(ref)] for ref in refs}


def interpolated(points: list[tuple[float, float]], predicted: float) -> float:
    """``predicted`` times the scale interpolated in log(predicted) between ``(predicted, scale)`` points."""
    xs, ys = zip(*sorted((math.log(p), math.log(s)) for p, s in points))
    return predicted * math.exp(float(np.interp(math.log(predicted), xs, ys)))


def rescaled(measurement: dict, scales: dict[str, float], kls: dict) -> dict:
    """The measurement with every candidate's predicted KL rescaled by the multi-bitrate scales."""
    out = json.loads(json.dumps(measurement))
    for key, values in out["predicted_kl"].items():
        points = [(r["predicted"][key], r["measured"][key] / r["predicted"][key]) for r in kls.values()]
        out["predicted_kl"][key] = [interpolated(points, v / scales[key]) for v in values]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS))
    parser.add_argument("--refs", type=float, nargs="+", default=[2.2, 3.0, 4.5])
    parser.add_argument("--bits", type=float, nargs="*", default=[2.5, 4.0])
    parser.add_argument("--length", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--eval-rows", type=int, default=8, help="evaluation windows per domain (at most)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exl2-bench-reference-bpw"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model_dir = MODELS[args.model]()
    args.work.mkdir(parents=True, exist_ok=True)
    measured = args.work / "measurement.json"
    if not measured.is_file():
        convert(Settings(in_dir=str(model_dir), output_measurement=str(measured), **ROWS),
                args.work / "job-measure", Runtime(quiet=True), restart=True)
    kls = reference_kls(args.work / "job-measure", args.refs, args.work / "reference-kls.json")
    refs = list(kls)
    low, high = refs[0], refs[-1]
    print(f"\n| slot | " + " | ".join(f"scale at {r} bpw" for r in refs) + f" | β ({low}–{high}) |")
    print("|" + "---|" * (len(refs) + 2))
    betas = []
    for key in kls[low]["predicted"]:
        p0, p1 = kls[low]["predicted"][key], kls[high]["predicted"][key]
        m0, m1 = kls[low]["measured"][key], kls[high]["measured"][key]
        betas.append(math.log(m0 / m1) / math.log(p0 / p1))
        print(f"| {key} | " + " | ".join(f"{kls[r]['measured'][key] / kls[r]['predicted'][key]:.2f}" for r in refs)
              + f" | {betas[-1]:.2f} |")
    print(f"β min / median / max: {min(betas):.2f} / {float(np.median(betas)):.2f} / {max(betas):.2f}")

    measurement = json.loads(measured.read_text())
    scales = Sensitivity.load(args.work / "job-measure" / "sensitivity.safetensors").scales
    variants = {"one scale": measured, "scales at " + ", ".join(refs): args.work / "measurement-rescaled.json"}
    variants["scales at " + ", ".join(refs)].write_text(json.dumps(rescaled(measurement, scales, kls)))
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for bits in args.bits:
        for i, (name, path) in enumerate(variants.items()):
            tag = f"{i}-{bits}"
            if tag not in results:
                out = args.work / f"model-{tag}"
                convert(Settings(in_dir=str(model_dir), measurement=str(path), bits=bits, compile_full=str(out),
                                 **ROWS), args.work / f"job-{tag}", Runtime(quiet=True), restart=True)
                results[tag] = {d: asdict(score(out, model_dir, d, args)) for d in DOMAINS}
                results_path.write_text(json.dumps(results, indent=1))
    print("\n| bpw | allocation | " + " | ".join(f"KL {d}" for d in DOMAINS) + " | "
          + " | ".join(f"vs one scale {d}" for d in DOMAINS) + " |")
    print("|" + "---|" * (2 + 2 * len(DOMAINS)))
    for bits in args.bits:
        base = results[f"0-{bits}"]
        for i, name in enumerate(variants):
            r = results[f"{i}-{bits}"]
            print(f"| {bits} | {name} | " + " | ".join(f"{r[d]['kl']:.4f}" for d in DOMAINS) + " | "
                  + " | ".join(f"{r[d]['kl'] / base[d]['kl']:.3f}" for d in DOMAINS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
