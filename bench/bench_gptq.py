"""Seconds per linear layer of the GPTQ quantizer, for each distinct candidate setting of a shape.

Measurement quantizes every distinct table setting of every linear, so this is the converter's hot
path. Usage::

    python bench/bench_gptq.py [--device cpu|cuda] [--shapes small|llama7b] [--quick]
                               [--max-settings N] [--threads N]

``--quick`` uses the small shapes and three settings per shape (a couple of minutes on a small CPU).
Hessians are synthetic (low-rank plus diagonal, unequal feature energies) and built directly, since
only quantization speed is measured; Hessian preparation is timed separately.
"""

from __future__ import annotations

import argparse
import time

import torch

from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.qparams import QParams, distinct_settings

#: (label, in_features, out_features, table, roles sharing that shape)
SHAPES = {
    "llama7b": [
        ("q/k/v/o 4096x4096", 4096, 4096, "attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("gate/up 4096->11008", 4096, 11008, "mlp", ("gate_proj", "up_proj")),
        ("down 11008->4096", 11008, 4096, "mlp", ("down_proj",)),
    ],
    "small": [
        ("attn 1024x1024", 1024, 1024, "attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("gate/up 1024->2752", 1024, 2752, "mlp", ("gate_proj", "up_proj")),
        ("down 2752->1024", 2752, 1024, "mlp", ("down_proj",)),
    ],
}


def settings_for(table: str, roles: tuple[str, ...]) -> list[QParams]:
    """Distinct settings (by desc, first-seen order) over all table columns that share a shape."""
    seen: dict[str, QParams] = {}
    for role in roles:
        for qp in distinct_settings(table, role)[0]:
            seen.setdefault(qp.desc, qp)
    return list(seen.values())


def synthetic_hessian(k: int, device: torch.device, seed: int) -> Hessian:
    gen = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(64, k, generator=gen)
    energy = torch.exp(torch.randn(k, generator=gen))
    h = (low_rank.T @ low_rank + torch.diag(torch.rand(k, generator=gen) + 0.1)) * torch.outer(energy, energy)
    return Hessian.from_matrix(h.to(device), num_batches=1)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="small", choices=sorted(SHAPES))
    parser.add_argument("--quick", action="store_true", help="small shapes, three settings per shape")
    parser.add_argument("--max-settings", type=int, default=0, help="limit settings per shape (0 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SHAPES["small" if args.quick else args.shapes]
    limit = 3 if args.quick and not args.max_settings else args.max_settings

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    total = 0.0
    for index, (label, k, n, table, roles) in enumerate(shapes):
        settings = settings_for(table, roles)
        if limit:
            picks = sorted({round(i * (len(settings) - 1) / max(limit - 1, 1)) for i in range(limit)})
            settings = [settings[i] for i in picks]
        hessian = synthetic_hessian(k, device, seed=index)
        prep_s, prepared = timed(lambda: hessian.prepare(label), device)
        gen = torch.Generator().manual_seed(100 + index)
        weight = (torch.randn(n, k, generator=gen) * 0.02).half().to(device)
        print(f"\n{label}: in={k} out={n}  prepare {prep_s:.2f} s  ({len(settings)} settings)")
        for qp in settings:
            seconds, _ = timed(lambda: quantize_linear(weight, prepared, qp), device)
            total += seconds
            print(f"  {qp.desc:<40} {seconds:8.2f} s/layer  ({qp.bpw(k, n):.3f} bpw)")
    print(f"\nquantize total {total:.1f} s")


if __name__ == "__main__":
    main()
