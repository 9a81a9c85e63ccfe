"""Where the CPU time of a conversion goes: profile one attention and one MLP block of a model.

    python bench/profile_module.py MODEL_DIR [--layer 0] [--rows 16] [--length 2048]
        [--pass measure|measure-hessian|measure-fast|quant] [--fit local|sequential|asymmetric]
        [--fit-strength S] [--refine SWEEPS]

Runs the measurement (every candidate of the tables; ``measure-hessian``/``measure-fast``: the
``--measure hessian|fast`` scoring, with unit sensitivities since their values do not change the time) or the
quantization pass (one setting per linear, fitted as ``--fit`` says) of one layer on random-but-realistic
inputs (the model's own embeddings of random token ids) and prints the wall time per block and the top
functions by own time. Multiply by the number of layers for a whole model.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from exl2core.model.source import SourceModel
from exl2core.modules.forward import module_forward
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.measure import estimate_module, measure_module
from exl2core.pipeline.quantize import QuantizerOptions, quantize_module
from exl2core.pipeline.runner import embed_rows
from exl2core.pipeline.sensitivity import Sensitivity
from exl2core.plugins import resolve_plan
from exl2core.quant.qparams import FITS, PRODUCT_DTYPES, table_setting

#: The table rows the quantization pass profile uses: 4-bit settings, typical of a 4.0 bpw target.
QUANT_ROW = {"attn": 6, "mlp": 7}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--pass", dest="which", choices=("measure", "measure-hessian", "measure-fast", "quant"), default="measure")
    parser.add_argument("--fit", choices=FITS, default="local", help="the quantization pass's fit (--pass quant)")
    parser.add_argument("--fit-strength", type=float, default=1.0, help="the asymmetric fit's strength (--pass quant)")
    parser.add_argument("--refine", type=int, default=0, help="code refinement sweeps (--pass quant)")
    parser.add_argument("--matmul-dtype", choices=PRODUCT_DTYPES, default="float32",
                        help="dtype the block's forwards multiply their linears in (--pass quant)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    source = SourceModel(args.model)
    plan = resolve_plan(source.config)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, source.config.vocab_size, (args.rows, args.length), generator=gen)
    states = HiddenStates(embed_rows(source, plan, ids, dtype, device), device)
    blocks = [m for m in plan.modules if m.slots and m.layer == args.layer]
    print(f"{args.model}: layer {args.layer}, {args.rows}×{args.length} rows, {args.which} pass, "
          f"{torch.get_num_threads()} threads, {device}")
    for module in blocks:
        weights = source.module_weights(module, dtype, device)
        if args.which == "measure":
            call = lambda: measure_module(module_forward(module), module, weights, states)  # noqa: E731
        elif args.which.startswith("measure-"):
            ones = Sensitivity({Sensitivity.key(module, lin.name): torch.ones(lin.out_features, dtype=torch.float64)
                                for lin in module.linears})
            call = lambda: estimate_module(module_forward(module), module, weights, states, ones,  # noqa: E731
                                           args.which.removeprefix("measure-"))
        else:
            strategy = {s.key: {role: table_setting(s.table, QUANT_ROW[s.table], role).to_dict()
                                for role in s.roles} for s in module.slots}
            # The asymmetric fit's reference: the unquantized model's states, here the block's own inputs.
            call = lambda: quantize_module(module_forward(module), module, weights, states,  # noqa: E731
                                           strategy, 6, _scratch(), options=QuantizerOptions(
                                               fit=args.fit, fit_strength=args.fit_strength, refine=args.refine,
                                               matmul_dtype=args.matmul_dtype),
                                           reference=states)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.runcall(call)
        print(f"\n{module.measurement_key}: {time.perf_counter() - start:.1f} s")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="exl2-profile-"))


if __name__ == "__main__":
    main()
