"""Measurement modes side by side: ``--measure exact`` (one block forward per candidate, exllamav2's
method, Σ err² allocation) against ``--measure fast`` (GPTQ's expected error of each candidate, allocation
by the KL predicted from each linear's output sensitivity; ``--modes`` may add ``hessian``), on real
models and held-out text.

    python bench/bench_allocation.py [--models smollm2 gemma3-270m] [--bits 2.5 3.0 4.0 5.0]
        [--modes exact fast fast-marginal fast-isolated fast-isolated-whole fast-linear fast-isolated-refs]
        [--fit local|asymmetric] [-mr 4 -ml 512 -r 16 -l 512]
        [--eval-rows 8] [--work /tmp/bench_allocation] [--append-to FILE]

Per model: one measurement per mode (``exl2 convert -om``, timed), then for each target one quantization
per mode reusing that measurement (``-m``) with the same quantization rows, so only the allocation differs;
each output is scored against the FP16 model on windows of the held-out text (``exl2core/data/eval``,
never calibration data): perplexity, KL and top-1 agreement. Also reported: how well the fast mode's
cheap scores rank each slot's candidates against the exact mode's forward-measured errors (Spearman,
per slot), and the bits each mode gives each slot. Results are kept in ``WORK/results.json`` (a rerun
skips finished steps) and the tables are appended to ``bench/RESULTS.md`` unless ``--append-to ''``. Runs
of different modes may share WORK at once (one per core); only a run whose ``--modes`` start with ``exact``
writes the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import MODELS  # noqa: E402

from exl2core.eval.data import DEFAULT_DATA_NAME, load_text, token_windows  # noqa: E402
from exl2core.eval.perplexity import evaluate  # noqa: E402
from exl2core.model.exl2_weights import open_model  # noqa: E402

#: Mode name → the ``exl2 convert`` arguments of its measurement. ``fast`` weights each slot's predicted KL
#: by the Fisher sensitivity alone (the method before ``--sensitivity``), ``fast-marginal`` scales it by the
#: slot's measured marginal KL, ``fast-isolated`` by the KL of the slot's error alone (``-whole``: that KL summed over
#: the whole vocabulary, as before ``--kl-samples``), ``fast-linear`` each linear's by the KL of its own error alone.
MODES = {
    "exact": ["--measure", "exact"],
    "hessian": ["--measure", "hessian", "--sensitivity", "fisher"],
    "fast": ["--measure", "fast", "--sensitivity", "fisher"],
    "fast-marginal": ["--measure", "fast", "--sensitivity", "marginal"],
    "fast-isolated": ["--measure", "fast", "--sensitivity", "isolated"],
    "fast-isolated-whole": ["--measure", "fast", "--sensitivity", "isolated", "--kl-samples", "0"],
    "fast-linear": ["--measure", "fast", "--sensitivity", "linear"],
}
#: Modes whose measurement is made from another mode's finished one instead of a run of its own:
#: ``fast-isolated-refs`` is fast-isolated with each slot's scale measured at ``REFERENCE_BPWS`` and interpolated
#: (``bench_reference_bpw.py``), its measurement time that of the extra isolated-KL passes.
DERIVED = {"fast-isolated-refs": "fast-isolated"}
REFERENCE_BPWS = [2.2, 3.0, 4.5]



def convert(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``exl2 convert`` with ``args``; returns its wall time and CPU time (user + system) in seconds,
    the latter less sensitive to other work on a shared machine (raises with the log's tail on failure).

    The times are kept beside the log (``.seconds.json``): a step whose times exist is not run again, and an
    interrupted step resumes (its job directory is reused), so a rerun of the benchmark continues."""
    timing = log.with_suffix(".seconds.json")
    if timing.is_file():
        saved = json.loads(timing.read_text())
        return saved["seconds"], saved["cpu_seconds"]
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "exl2core.cli", "convert", "--device", "cpu", *args],
                              stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"exl2 convert failed ({log}):\n{log.read_text()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    seconds = time.monotonic() - started
    timing.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))
    return seconds, cpu


def derive(base: Path, mode: str) -> dict[str, float]:
    """Write the measurement of ``DERIVED`` mode ``mode`` from its source mode's finished job; its cost."""
    from bench_reference_bpw import reference_kls, rescaled

    from exl2core.pipeline.sensitivity import Sensitivity

    source = DERIVED[mode]
    if not (base / f"meas-{source}.json").is_file():
        raise SystemExit(f"{mode} is made from the {source} measurement: run --modes {source} first")
    started, cpu = time.monotonic(), time.process_time()
    kls = reference_kls(base / f"meas-{source}", REFERENCE_BPWS, base / f"meas-{mode}.kls.json")
    scales = Sensitivity.load(base / f"meas-{source}" / "sensitivity.safetensors").scales
    measurement = json.loads((base / f"meas-{source}.json").read_text())
    (base / f"meas-{mode}.json").write_text(json.dumps(rescaled(measurement, scales, kls)))
    return {"seconds": time.monotonic() - started, "cpu_seconds": time.process_time() - cpu}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(x: list[float]) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):
            tied = x == value
            r[tied] = r[tied].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def slot_lists(measurement: dict) -> dict[str, list]:
    """``{slot name: list}`` for a measurement or predicted-KL dict (parallel decoders: one per table)."""
    out = {}
    for key, value in measurement.items():
        if isinstance(value, list):
            out[key] = value
        elif isinstance(value, dict):
            out.update({f"{key}[{table}]": v for table, v in value.items()})
    return out


def rank_agreement(exact: dict, other: dict) -> dict:
    """Per slot, Spearman of the exact errors against another mode's record errors and predicted KL."""
    exact_slots = slot_lists(exact["measurement"])
    other_slots = slot_lists(other["measurement"])
    kl_slots = slot_lists(other["predicted_kl"])
    error, kl = [], []
    for name, records in exact_slots.items():
        err = [1 - r["accuracy"] for r in records]
        error.append(spearman(err, [1 - r["accuracy"] for r in other_slots[name]]))
        kl.append(spearman(err, kl_slots[name]))
    return {"error": error, "kl": kl}


def chosen_bpw(job_dir: Path) -> dict[str, float]:
    """Bits per weight of the record chosen for each slot (strategy key[table])."""
    state = json.loads((job_dir / "job.json").read_text())["state"]
    out = {}
    for key, record in state["strategy"].items():
        out[key] = record["total_bits"]
    return out


def run_model(name: str, model_dir: Path, a, work: Path, results: dict, windows_cache: dict) -> None:
    base = work / name
    base.mkdir(parents=True, exist_ok=True)
    res = results.setdefault(name, {"measure": {}, "quant": {}})
    cal = ["-mr", str(a.measurement_rows), "-ml", str(a.measurement_length)]
    for mode in a.modes:
        if mode in res["measure"]:
            continue
        if mode in DERIVED:
            res["measure"][mode] = derive(base, mode)
            save(work, results)
            continue
        seconds, cpu = convert(["-i", str(model_dir), "-o", str(base / f"meas-{mode}"), *MODES[mode],
                                "-om", str(base / f"meas-{mode}.json"), *cal], base / f"meas-{mode}.log")
        res["measure"][mode] = {"seconds": seconds, "cpu_seconds": cpu}
        save(work, results)
    ref = open_model(model_dir, "cpu")
    key = str(model_dir)
    if key not in windows_cache:
        windows_cache[key] = token_windows(ref.source.tokenizer, load_text(None), a.length, a.eval_rows)
    windows = windows_cache[key]
    for bits in a.bits:
        for mode in a.modes:
            tag = f"{mode}-{bits}"
            if tag in res["quant"]:
                continue
            job, out = base / f"q-{tag}", base / f"q-{tag}-model"
            seconds, cpu = convert(["-i", str(model_dir), "-o", str(job), "-m", str(base / f"meas-{mode}.json"),
                               "-b", str(bits), "-r", str(a.rows), "-l", str(a.length), "-cf", str(out),
                               *(["--fit", a.fit] if a.fit else [])],
                              base / f"q-{tag}.log")
            state = json.loads((job / "job.json").read_text())["state"]
            result = evaluate(open_model(out, "cpu"), windows, ref, data=DEFAULT_DATA_NAME)
            res["quant"][tag] = {
                "mode": mode, "bits": bits, "seconds": seconds, "cpu_seconds": cpu, "bpw": state["optimization"]["bpw"],
                "predicted_kl": state["optimization"].get("predicted_kl"),
                "perplexity": result.perplexity, "ref_perplexity": result.ref_perplexity,
                "kl": result.kl_divergence, "top1": result.top1_agreement,
                "slot_bits": chosen_bpw(job),
            }
            save(work, results)
            print(f"{name} {tag}: KL {result.kl_divergence:.4f}, ppl {result.perplexity:.3f}", flush=True)


def save(work: Path, results: dict) -> None:
    """Write ``WORK/results.json``, first taking in the steps another run sharing WORK (other modes, on the
    other core) saved meanwhile."""
    path = work / "results.json"
    for name, theirs in (json.loads(path.read_text()) if path.is_file() else {}).items():
        ours = results.setdefault(name, {"measure": {}, "quant": {}})
        for part in ("measure", "quant"):
            ours[part] |= {step: r for step, r in theirs[part].items() if step not in ours[part]}
    path.write_text(json.dumps(results, indent=2))


def report(results: dict, a, command: str) -> str:
    lines = ["## Measurement modes: exact (a forward per candidate) vs fast (expected GPTQ error and output "
             "sensitivity)", "",
             f"`{command}` (2-core CPU shared with other work, so CPU seconds are the comparable cost; measurement "
             f"{a.measurement_rows} × {a.measurement_length} tokens, quantization {a.rows} × {a.length}, held-out "
             f"{a.eval_rows} × {a.length} tokens of {DEFAULT_DATA_NAME}; each quantization reuses its mode's "
             "measurement with the same rows, so only the allocation differs).", ""]
    for name, res in results.items():
        exact = res["measure"]["exact"]
        base = a.work / name
        measured = json.loads((base / "meas-exact.json").read_text())
        res["rank"] = {mode: rank_agreement(measured, json.loads((base / f"meas-{mode}.json").read_text()))
                       for mode in a.modes if mode != "exact"}
        lines += [f"### {name}", "", "| measurement | wall (s) | CPU (s) | CPU vs exact | rank agreement with "
                  "exact per slot (Spearman, median / min): record error, predicted KL |", "|---|---|---|---|---|"]
        for mode in a.modes:
            m = res["measure"][mode]
            rank = res["rank"].get(mode)
            agreement = (f"{np.nanmedian(rank['error']):.3f} / {np.nanmin(rank['error']):.3f}, "
                         f"{np.nanmedian(rank['kl']):.3f} / {np.nanmin(rank['kl']):.3f}") if rank else "–"
            lines.append(f"| {mode} | {m['seconds']:.0f} | {m['cpu_seconds']:.0f} | "
                         f"{exact['cpu_seconds'] / m['cpu_seconds']:.1f}× less | {agreement} |")
        lines += ["", "| target | mode | bpw | predicted KL | KL | KL vs exact | perplexity | top-1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for bits in a.bits:
            ref = res["quant"].get(f"exact-{bits}")
            for mode in a.modes:
                q = res["quant"].get(f"{mode}-{bits}")
                if q is None:
                    continue
                ratio = f"{q['kl'] / ref['kl']:.2f}×" if ref and mode != "exact" else ""
                pred = f"{q['predicted_kl']:.4f}" if q["predicted_kl"] is not None else "–"
                lines.append(f"| {bits} | {mode} | {q['bpw']:.4f} | {pred} | {q['kl']:.4f} | {ratio} | "
                             f"{q['perplexity']:.3f} | {100 * q['top1']:.2f} % |")
        any_q = next(iter(res["quant"].values()))
        lines += ["", f"FP16 perplexity {any_q['ref_perplexity']:.3f}.", ""]
        mid = 3.0 if 3.0 in a.bits else a.bits[0]
        chosen = {mode: res["quant"].get(f"{mode}-{mid}") for mode in a.modes}
        if all(chosen.values()):
            numel = slot_numel(MODELS[name]())
            lines += [f"Bits per weight of each slot at {mid} bpw:", "",
                      "| slot | " + " | ".join(a.modes) + " |", "|---" * (len(a.modes) + 1) + "|"]
            for key in chosen["exact"]["slot_bits"]:
                lines.append(f"| {key} | " + " | ".join(f"{chosen[m]['slot_bits'][key] / numel[key]:.2f}"
                                                          for m in a.modes) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def slot_numel(model_dir: Path) -> dict[str, int]:
    """Weights per strategy key (output features padded to 32, as the size accounting counts them)."""
    from exl2core.model.source import SourceModel
    from exl2core.plugins import resolve_plan

    plan = resolve_plan(SourceModel(model_dir).config)
    out = {}
    for module in plan.modules:
        for slot in module.slots:
            out[slot.key] = sum(lin.in_features * (-(-lin.out_features // 32) * 32)
                                for lin in module.linears if lin.role in slot.roles)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 4.0, 5.0])
    parser.add_argument("--modes", nargs="+", default=["exact", "fast-isolated"], choices=[*MODES, *DERIVED])
    parser.add_argument("--fit", help="the quantization pass's fit, the same for every mode (default: exl2 "
                        "convert's; local: the results recorded before the asymmetric fit became the default)")
    parser.add_argument("-mr", "--measurement-rows", type=int, default=4)
    parser.add_argument("-ml", "--measurement-length", type=int, default=512)
    parser.add_argument("-r", "--rows", type=int, default=16)
    parser.add_argument("-l", "--length", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_allocation"))
    parser.add_argument("--append-to", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    a = parser.parse_args()
    torch.manual_seed(0)
    a.work.mkdir(parents=True, exist_ok=True)
    path = a.work / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    windows_cache: dict = {}
    for name in a.models:
        run_model(name, MODELS[name](), a, a.work, results, windows_cache)
    if a.modes[0] != "exact":
        print("steps done; the table compares with exact: rerun with --modes exact first (finished steps are kept)")
        return
    text = report({n: results[n] for n in a.models}, a, "python bench/bench_allocation.py " + " ".join(sys.argv[1:]))
    print(text)
    (a.work / "results.md").write_text(text)
    if a.append_to:
        with open(a.append_to, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
