"""The quantizer's options against exllamav2's quantizer and today's default, on one shared measurement.

    python bench/bench_quantizer.py whole [MODEL] [-m MEASUREMENT] [--bits 2.5 3.0 4.0]
    python bench/bench_quantizer.py blocks [MODEL] [--layers 8] [--rows 16] [--length 512]

``MODEL`` is an FP16 HF directory or a name from ``bench/models.py`` (``smollm2``, the default, or
``gemma3-270m``).

``whole``: one measurement (made once with 4 × 512 rows unless ``-m`` names one) and, per target bitrate
and variant, a quantization pass (``-r/-l``, default 16 × 512) compiled to an EXL2 model, scored on the
built-in held-out text against the FP16 model (perplexity, KL, top-1 agreement), with the wall time of
the conversion. ``blocks``: the first ``--layers`` decoder blocks quantized at fixed candidate-table rows
by each variant, and the relative error of the hidden state after each block on held-out text, against
the unquantized model's (what the asymmetric fit minimises, and what the next block receives).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from exl2core.pipeline.quantize import QuantizerOptions

#: Variant name → how it quantizes (``exl2 convert``'s options of the quantization pass, see ``arguments``).
VARIANTS = {
    "exllamav2": QuantizerOptions(search="exllamav2"),
    "previous-default": QuantizerOptions(),
    "sequential": QuantizerOptions(fit="sequential"),
    "asymmetric": QuantizerOptions(fit="asymmetric"),
    "layout": QuantizerOptions(layout="hessian"),
    "all": QuantizerOptions(fit="asymmetric", layout="hessian"),
    "damped": QuantizerOptions(fit="asymmetric", fit_strength=0.5),
    "refined": QuantizerOptions(fit="asymmetric", refine=2),
    "damped-refined": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2),
    "gptq-damp-0.25": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2, damp=0.25),
    "gptq-damp-0.04": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2, damp=0.04),
    "gptq-damp-0.01": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2, damp=0.01),
    "refined-4": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=4),
    "strength-0.4": QuantizerOptions(fit="asymmetric", fit_strength=0.4, refine=2),
    "damp-0.25-refined-4": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=4, damp=0.25),
    "token-weighted": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2, token_weight=0.25),
    "token-weighted-bf16": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2, token_weight=0.25,
                                            matmul_dtype="bfloat16"),
    "token-weighted-0.5": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=2, token_weight=0.5),
    "local-refined": QuantizerOptions(fit="local", refine=2),
    "local-token-weighted": QuantizerOptions(fit="local", refine=2, token_weight=0.25),
    "token-damp-refined-4": QuantizerOptions(fit="asymmetric", fit_strength=0.5, refine=4, damp=0.25,
                                             token_weight=0.25),
}
#: Candidate-table rows of the ``blocks`` comparison: about 2.4 and 4.1 bits per weight.
TABLE_ROWS = {"attn": (2, 6), "mlp": (2, 7)}


def arguments(options: QuantizerOptions) -> list[str]:
    """The ``exl2 convert`` arguments that quantize as ``options`` says, every one explicit."""
    return ["--scale-search", options.search, "--fit", options.fit, "--fit-strength", str(options.fit_strength),
            "--bit-layout", options.layout, "--refine", str(options.refine), "--damp", str(options.damp),
            "--token-weight", str(options.token_weight), "--matmul-dtype", options.matmul_dtype]


def model_dir(name_or_path: str | None) -> str:
    """A directory, or a name from ``bench/models.py`` (default SmolLM2-135M), prepared on first use."""
    from models import MODELS

    if name_or_path is None or name_or_path in MODELS:
        return str(MODELS[name_or_path or "smollm2"]())
    return name_or_path


def convert(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "exl2core.cli", "convert", *args, "--device", "cpu"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def whole(args: argparse.Namespace) -> None:
    from exl2core.eval.data import load_text, token_windows
    from exl2core.eval.perplexity import evaluate
    from exl2core.model.exl2_weights import open_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_quantizer."))
    measurement = Path(args.measurement) if args.measurement else work / "measurement.json"
    if not measurement.is_file():
        seconds = convert(["-i", args.model, "-o", str(work / "measure"), "-nr", "-om", str(measurement),
                           "-mr", "4", "-ml", "512"])
        print(f"measurement (4 × 512 rows): {seconds:.0f} s → {measurement}")
    ref = open_model(args.model, "cpu")
    windows = token_windows(ref.source.tokenizer, load_text(), args.eval_length, args.eval_rows)
    print(f"{args.model}: quantization {args.rows} × {args.length}, held-out {windows.shape[0]} × "
          f"{windows.shape[1]} tokens, measurement {measurement}")
    print("| bpw | variant | perplexity | KL vs FP16 | KL ÷ exllamav2 | top-1 vs FP16 | conversion |")
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        base_kl = None
        for name in args.variants:
            out = work / f"out-{bits}-{name}"
            timing = work / f"out-{bits}-{name}.seconds"
            if not timing.is_file():  # a rerun in the same --work reuses the finished conversions
                seconds = convert(["-i", args.model, "-o", str(work / "job"), "-nr", "-m", str(measurement),
                                   "-b", str(bits), "-r", str(args.rows), "-l", str(args.length), "-cf",
                                   str(out), *arguments(VARIANTS[name])])
                timing.write_text(f"{seconds:.1f}\n")
            seconds = float(timing.read_text())
            result = evaluate(open_model(out, "cpu"), windows, ref)
            base_kl = result.kl_divergence if name == "exllamav2" else base_kl
            ratio = f"{result.kl_divergence / base_kl:.2f}×" if base_kl else "–"
            print(f"| {bits} | {name} | {result.perplexity:.3f} | {result.kl_divergence:.4f} | {ratio} | "
                  f"{100 * result.top1_agreement:.2f} % | {seconds:.0f} s |", flush=True)


def blocks(args: argparse.Namespace) -> None:
    from exl2core.eval.data import load_text, token_windows
    from exl2core.model.source import SourceModel
    from exl2core.modules.forward import module_forward
    from exl2core.pipeline.calibration import calibration_rows
    from exl2core.pipeline.hidden import HiddenStates
    from exl2core.pipeline.quantize import quantize_module
    from exl2core.pipeline.runner import embed_rows, forward_rows
    from exl2core.plugins import resolve_plan
    from exl2core.quant.qparams import table_setting

    source = SourceModel(args.model)
    plan = resolve_plan(source.config)

    def embedded(ids: torch.Tensor) -> HiddenStates:
        return HiddenStates(embed_rows(source, plan, ids), "cpu")

    cal = embedded(calibration_rows(source.tokenizer, source.config.vocab_size, args.rows, args.length))
    held = embedded(token_windows(source.tokenizer, load_text(), args.length, max(1, args.rows // 2)))
    modules = [m for m in plan.modules[1:] if m.slots][: 2 * args.layers]
    print(f"{args.model}: calibration {args.rows}×{args.length}, held-out {len(held)}×{args.length}; relative "
          "error of the hidden state after each block vs the unquantized model on the held-out rows")
    print("| table row (attn, mlp) | variant | " + " | ".join(f"{m.layer}.{m.mode[:4]}"
                                                       for m in modules[1::2]) + " | seconds |")
    print("|---|---|" + "---|" * (len(modules) // 2 + 1))
    for attn_row, mlp_row in zip(TABLE_ROWS["attn"], TABLE_ROWS["mlp"]):
        for name in args.variants:
            opts = VARIANTS[name]
            q_cal, ref_cal, q_held, ref_held = cal, cal, held, held
            errors, seconds = [], 0.0
            for module in modules:
                row = attn_row if module.slots[0].table == "attn" else mlp_row
                strategy = {slot.key: {lin.role: table_setting(slot.table, row, lin.role).to_dict()
                                       for lin in module.linears if lin.role in slot.roles}
                            for slot in module.slots}
                weights = source.module_weights(module, torch.float32, "cpu")
                unquantized = dict(weights)
                fwd = module_forward(module)
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    result = quantize_module(fwd, module, weights, q_cal, strategy, 6, Path(tmp), options=opts,
                                             reference=ref_cal)
                seconds += time.perf_counter() - start
                ref_held_out = forward_rows(fwd, module, unquantized, ref_held)
                q_held_out = forward_rows(fwd, module, weights, q_held)
                q_cal = q_cal.replaced(result.outputs)
                ref_cal = ref_cal.replaced(result.reference_outputs or forward_rows(fwd, module, unquantized, ref_cal))
                q_held, ref_held = q_held.replaced(q_held_out), ref_held.replaced(ref_held_out)
                err = sum((torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
                          for a, b in zip(q_held.rows, ref_held.rows)) / len(held)
                errors.append(err)
            print(f"| {attn_row}, {mlp_row} | {name} | " + " | ".join(f"{e:.4f}" for e in errors[1::2])
                  + f" | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("whole", help="whole-model held-out KL per bitrate and variant")
    w.add_argument("model", nargs="?", help="directory or bench/models.py name (default smollm2)")
    w.add_argument("-m", "--measurement", help="shared measurement.json (default: made once, 4 × 512 rows)")
    w.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    w.add_argument("--rows", type=int, default=16)
    w.add_argument("--length", type=int, default=512)
    w.add_argument("--eval-rows", type=int, default=6)
    w.add_argument("--eval-length", type=int, default=2048)
    w.add_argument("--work", help="working directory (default: a new temporary one); a rerun in the same one "
                                  "reuses its measurement and finished conversions")
    w.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    b = sub.add_parser("blocks", help="held-out hidden-state error after each block, per variant")
    b.add_argument("model", nargs="?", help="directory or bench/models.py name (default smollm2)")
    b.add_argument("--layers", type=int, default=8)
    b.add_argument("--rows", type=int, default=16)
    b.add_argument("--length", type=int, default=512)
    b.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    args.model = model_dir(args.model)
    whole(args) if args.command == "whole" else blocks(args)


if __name__ == "__main__":
    main()
