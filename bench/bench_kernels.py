"""Speed of each exl2core CUDA kernel against its PyTorch reference on the same GPU (Llama-7B shapes).

Usage::

    python bench/bench_kernels.py [--repeats N] [--quick] [--skip-gptq]

Prints one table row per (kernel, shape): reference ms, kernel ms, speedup. The reference is the
torch implementation in exl2core.quant run on CUDA tensors, i.e. what runs when the extension is absent.
``exl2_matmul`` is also compared with a dense fp16 GEMM on the pre-dequantized weight (cuBLAS), the
speed a decode-sized matmul would have without quantization. ``quantize_linear`` times a whole GPTQ
layer with the kernels on and off (``EXL2_NO_KERNELS=1``). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch

from exl2core import kernels
from exl2core.kernels import build
from exl2core.quant import gptq, pack, rounding
from exl2core.quant.qparams import table_setting

#: (label, in_features K, out_features N, table, role, table row) — one representative setting per shape.
SHAPES = [
    ("q/k/v/o 4096x4096", 4096, 4096, "attn", "q_proj", 4),
    ("gate/up 4096->11008", 4096, 11008, "mlp", "up_proj", 5),
    ("down 11008->4096", 11008, 4096, "mlp", "down_proj", 9),
]
MATMUL_ROWS = (1, 16, 64)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def random_layer(k: int, n: int, table: str, role: str, row: int, gen: torch.Generator) -> tuple:
    qp = table_setting(table, row, role)
    groups = qp.groups(k)
    bits, rows = [b for b, _ in groups], [r for _, r in groups]
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen) for b, r in groups]).to(torch.int16)
    tensors = {
        "q_weight": pack.pack_codes(codes, bits, rows),
        "q_scale": pack.pack_scales(torch.randint(1, 17, (len(groups), n), generator=gen)),
        "q_scale_max": (torch.rand(len(groups), generator=gen) * 0.1 + 0.01).half(),
        "q_groups": pack.make_q_groups(bits, rows),
        "q_invperm": torch.argsort(torch.randperm(k, generator=gen)).to(torch.int32),
    }
    return qp, codes.cuda(), bits, rows, {name: t.cuda() for name, t in tensors.items()}


def set_kernels(enabled: bool) -> None:
    """Switch the dispatch between the extension and the reference for the rest of the process."""
    if enabled:
        os.environ.pop(build.DISABLE_ENV, None)
    else:
        os.environ[build.DISABLE_ENV] = "1"
    build.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one "kernels not used" warning of a deliberate switch-off
        build.load_extension()


def bench_shape(label: str, k: int, n: int, table: str, role: str, row: int, repeats: int,
                gptq_layer: bool) -> list[tuple[str, str, float, float]]:
    gen = torch.Generator().manual_seed(0)
    qp, codes, bits, rows, tensors = random_layer(k, n, table, role, row, gen)
    w = torch.randn(128, n, generator=gen).cuda() * 0.02
    found = gptq.search_scales(w, 4)
    zero, maxq = 8, 15
    diag = torch.ones(128, device="cuda")
    out: list[tuple[str, str, float, float]] = []

    def pair(name: str, reference: Callable[[], object], kernel: Callable[[], object]) -> None:
        out.append((name, label, timed(reference, repeats), timed(kernel, repeats)))

    def rows_loop(step):
        def run():
            for r in range(128):
                step(w[r], diag[r])
        return run

    pair("quantize_group (128 rows, 1 call/row)",
         rows_loop(lambda x, d: gptq.quantize_rows(x, found.scale, zero, maxq, d)),
         rows_loop(lambda x, d: kernels.quantize_group(x, found.scale, zero, maxq, d)))
    column_scale = (w.abs().amax(0) + 1e-12) / (maxq / 2)
    for count in (13, 97):
        multipliers = torch.linspace(0.7, 1.2, count, device="cuda")
        pair(f"grid_errors (128 rows, {count} multipliers)",
             lambda: rounding.grid_errors(w, multipliers, column_scale, zero, maxq),
             lambda: kernels.grid_errors(w, multipliers, column_scale, zero, maxq))
    pair("pack_codes", lambda: pack.pack_codes(codes, bits, rows),
         lambda: kernels.pack_codes(codes, bits, rows))
    pair("unpack_codes", lambda: pack.unpack_codes(tensors["q_weight"], tensors["q_groups"]),
         lambda: kernels.unpack_codes(tensors["q_weight"], tensors["q_groups"]))
    pair("dequantize", lambda: pack.dequantize(tensors), lambda: kernels.dequantize(tensors))
    prepared = kernels.prepare_matrix(tensors)
    dense = pack.dequantize(tensors)
    for m in MATMUL_ROWS:
        x = torch.randn(m, k, generator=gen).half().cuda()
        pair(f"exl2_matmul M={m} (vs dequantize+GEMM)", lambda: x @ pack.dequantize(tensors).T,
             lambda: kernels.exl2_matmul(x, prepared))
        pair(f"exl2_matmul M={m} (vs dense fp16 GEMM)", lambda: x @ dense.T,
             lambda: kernels.exl2_matmul(x, prepared))
    if gptq_layer:
        weight = (torch.randn(n, k, generator=gen) / k ** 0.5).cuda()
        hessian = gptq.Hessian(k, device="cuda")
        hessian.add(torch.randn(2048, k, generator=gen).cuda())
        prepared_h = hessian.prepare(label)
        times = []
        for enabled in (False, True):
            set_kernels(enabled)
            times.append(timed(lambda: gptq.quantize_linear(weight, prepared_h, qp), 1))
        out.append((f"quantize_linear {qp.desc}", label, *times))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="first shape only, 5 repeats")
    parser.add_argument("--skip-gptq", action="store_true", help="skip the whole-layer GPTQ timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA device (torch.cuda.is_available() is False); nothing to measure",
              file=sys.stderr)
        return 1
    set_kernels(True)
    if build.load_result().module is None:
        print(f"the CUDA kernels did not load: {build.load_result().reason}", file=sys.stderr)
        return 1
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 5 if args.quick else args.repeats
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, median of {repeats}")
    print(f"{'kernel':<44} {'shape':<22} {'ref ms':>9} {'kernel ms':>10} {'speedup':>8}")
    for shape in shapes:
        for name, label, ref_ms, kernel_ms in bench_shape(*shape, repeats, not args.skip_gptq):
            print(f"{name:<44} {label:<22} {ref_ms:>9.3f} {kernel_ms:>10.3f} {ref_ms / kernel_ms:>7.1f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
