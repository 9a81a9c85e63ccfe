"""exl2core's Hessian scale search against exllamav2's, per linear layer of a real model, on held-out text.

    python bench/bench_scale_search.py [MODEL_DIR] [--layers 0 15] [--rows 8] [--length 1024]

Runs the model unquantized up to each chosen layer on calibration rows (the built-in mix) and on windows
of the held-out evaluation text, collecting each linear's input Hessian on both. Every linear of the
layer is then quantized by GPTQ with Hessians from the calibration rows, at three candidate-table rows
per block (about 2.4, 4.1 and 4.4 bits per weight), once per scale search, and scored by its output error on the
held-out text: ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``. The table gives the geometric mean, over the layer's
linears, of the Hessian search's error divided by exllamav2's (below 1: the default search is better).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from exl2core.eval.data import load_text, token_windows
from exl2core.model.source import SourceModel
from exl2core.modules.forward import module_forward
from exl2core.pipeline.calibration import calibration_rows
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.runner import embed_rows, forward_rows, prepare_hessians
from exl2core.plugins import resolve_plan
from exl2core.quant.gptq import quantize_linear
from exl2core.quant.qparams import pad32, table_setting

#: Candidate-table rows compared per block: about 2.4, 4.1 and 4.4 bits per weight.
TABLE_ROWS = {"attn": (2, 6, 10), "mlp": (2, 7, 10)}


def held_out_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = quantized.float() - weight.float()
    return (torch.einsum("ok,kl,ol->", delta, hessian, delta)
            / torch.einsum("ok,kl,ol->", weight.float(), hessian, weight.float())).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="FP16 HF directory (default: exl2core's SmolLM2-135M)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    parser.add_argument("--rows", type=int, default=8, help="calibration rows (held-out windows: half)")
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    if args.model is None:
        from exl2core.model.gguf_import import default_model_dir

        args.model = str(default_model_dir())

    source = SourceModel(args.model)
    plan = resolve_plan(source.config)

    def embedded(ids: torch.Tensor) -> HiddenStates:
        return HiddenStates(embed_rows(source, plan, ids), "cpu")

    cal = embedded(calibration_rows(source.tokenizer, source.config.vocab_size, args.rows, args.length))
    held = embedded(token_windows(source.tokenizer, load_text(), args.length, max(1, args.rows // 2)))
    print(f"{args.model}: calibration {args.rows}×{args.length}, held-out {len(held)}×{args.length}")
    print("| layer | block | table row | bits | exllamav2 error | hessian error | ratio | seconds (exl2, hess) |")
    print("|---|---|---|---|---|---|---|---|")
    for module in plan.modules[1:]:
        if not module.slots:
            break
        layer = module.layer
        if layer > max(args.layers):
            break
        weights = source.module_weights(module, torch.float32, "cpu")
        fwd = module_forward(module)
        wanted = layer in args.layers
        cal_h, held_h = ({}, {}) if wanted else (None, None)
        cal_out = forward_rows(fwd, module, weights, cal, cal_h)
        held_out = forward_rows(fwd, module, weights, held, held_h)
        if wanted:
            prepared = prepare_hessians(module, cal_h, "cpu")
            table = module.slots[0].table
            for row in TABLE_ROWS[table]:
                errors = {"exllamav2": [], "hessian": []}
                seconds = dict.fromkeys(errors, 0.0)
                stored = numel = 0
                for lin in module.linears:
                    qp = table_setting(table, row, lin.role)
                    stored += qp.total_bits(lin.in_features, pad32(lin.out_features))
                    numel += lin.in_features * pad32(lin.out_features)
                    hessian = held_h[lin.input].matrix / held_h[lin.input].num_batches
                    for search in errors:
                        start = time.perf_counter()
                        q = quantize_linear(weights[lin.name], prepared[lin.name], qp, search=search)
                        seconds[search] += time.perf_counter() - start
                        errors[search].append(held_out_error(weights[lin.name], q.weight[: lin.out_features],
                                                             hessian))
                ratio = math.exp(sum(math.log(h / e) for h, e in zip(errors["hessian"], errors["exllamav2"]))
                                 / len(module.linears))
                mean = {k: sum(v) / len(v) for k, v in errors.items()}
                print(f"| {layer} | {module.mode} | {row} | {stored / numel:.2f} | {mean['exllamav2']:.5f} | "
                      f"{mean['hessian']:.5f} | {ratio:.3f} | {seconds['exllamav2']:.1f}, {seconds['hessian']:.1f} |",
                      flush=True)
        cal, held = cal.replaced(cal_out), held.replaced(held_out)


if __name__ == "__main__":
    main()
