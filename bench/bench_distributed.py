"""Wall time per pass of one conversion on 1 and N torch.distributed ranks, the bytes the ranks exchange,
and whether every rank count wrote the same model.

    python bench/bench_distributed.py --model smollm2 --ranks 1 2            # CPU: gloo, cores split evenly
    python bench/bench_distributed.py --model 7b --ranks 1 2 4 --device cuda  # one rank per GPU, nccl

``--model 7b`` is a synthetic Llama with Llama-2-7B's layer widths, ``--model smollm2-width`` one with
SmolLM2-135M's (``bench_memory.write_model``, random weights, ``--depth`` layers). One rank runs as a plain ``exl2 convert`` (all cores, or the first GPU); N
ranks run under ``torchrun --nproc-per-node N``, each with its share of the cores (``cores // N`` threads)
or its own GPU. Each pass's wall time is taken from rank 0's ``--status-json`` progress lines as they
arrive; the traffic is the job's own count (``N ranks sent … MB in this pass``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_memory
from models import smollm2_dir

#: Passes reported, by the progress stage names of rank 0.
PASSES = ("Sensitivity", "Marginal KL", "Measuring", "Quantizing")
#: Layer widths of the synthetic models (random weights, ``--depth`` layers, SmolLM2's vocabulary).
WIDTHS = {"7b": bench_memory.SHAPES["7b"],
          "smollm2-width": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                num_key_value_heads=3)}


def source(args) -> Path:
    if args.model == "smollm2":
        return smollm2_dir()
    path = args.work / f"{args.model}-{args.depth}"
    return bench_memory.write_model(path, WIDTHS[args.model], args.depth, smollm2_dir(), 49152)


def run(args, src: Path, ranks: int) -> dict:
    """One conversion on ``ranks`` ranks: seconds per pass, MB sent per module in each pass, the output's
    digest."""
    job, out = args.work / f"job-{args.model}-{ranks}", args.work / f"out-{args.model}-{ranks}"
    convert = ["convert", "-i", str(src), "-o", str(job), "-cf", str(out), "-nr", "--status-json",
               "--device", args.device, "-b", str(args.bits), *args.convert]
    if ranks == 1:
        cmd = [sys.executable, "-m", "exl2core.cli", *convert]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "-m", "exl2core.cli", *convert]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    times: dict[str, float] = {}
    sent: dict[str, float] = {}
    stage, since = None, started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        now = time.monotonic()
        if event.get("stage") != stage:
            if stage in PASSES:
                times[stage] = times.get(stage, 0.0) + now - since
            stage, since = event.get("stage"), now
        message = event.get("message", "")
        if " ranks sent " in message:  # "2 ranks sent 12.3 MB in this pass (0.41 MB per module)"
            sent[stage] = float(message.split("(")[-1].split(" MB")[0])
    if proc.wait() != 0:
        raise SystemExit(f"{ranks} ranks: exl2 convert exited with {proc.returncode}")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("output*.safetensors"))))
    return {"ranks": ranks, "total": time.monotonic() - started, "passes": times, "sent_mb": sent,
            "digest": digest.hexdigest()[:16]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", *WIDTHS), default="smollm2")
    parser.add_argument("--depth", type=int, default=1, help="layers of a synthetic model")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_distributed"))
    parser.add_argument("convert", nargs="*", default=["-mr", "4", "-ml", "256", "-r", "8", "-l", "256"],
                        help="further exl2 convert arguments (after --; default: -mr 4 -ml 256 -r 8 -l 256)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = source(args)
    results = [run(args, src, n) for n in args.ranks]
    base = results[0]
    print(f"{args.model} on {args.device}, exl2 convert {' '.join(args.convert)} -b {args.bits}")
    print(f"{'ranks':>5} {'total s':>8} " + " ".join(f"{p + ' s':>14}" for p in PASSES)
          + f" {'MB/module m':>11} {'MB/module q':>11} {'speedup':>7}  output")
    for r in results:
        passes = " ".join(f"{r['passes'].get(p, 0.0):14.1f}" for p in PASSES)
        work = lambda x: x["passes"].get("Measuring", 0) + x["passes"].get("Quantizing", 0)  # noqa: E731
        same = "same bytes" if r["digest"] == base["digest"] else "DIFFERENT"
        print(f"{r['ranks']:>5} {r['total']:8.1f} {passes} {r['sent_mb'].get('Measuring', 0):11.2f} "
              f"{r['sent_mb'].get('Quantizing', 0):11.2f} {work(base) / max(work(r), 1e-9):6.2f}x  {same}")
    return 0 if all(r["digest"] == base["digest"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
