"""Compile the exl2core CUDA extension and report what was built (no GPU needed).

Usage::

    TORCH_CUDA_ARCH_LIST="9.0" python bench/build_kernels.py [--verbose]

Without a visible GPU, ``TORCH_CUDA_ARCH_LIST`` must name the target architectures. Exits 0 when the
extension compiled and imported, 1 with the reason otherwise. The result lands in the same cache that
``exl2core.kernels`` loads from, so a later run on that machine does not compile again.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from exl2core.errors import Exl2Error
from exl2core.kernels import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler command lines")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, archs {build.arch_list() or 'none'}")
    print(f"cache: {build.build_dir()} ({'already built' if build.is_built() else 'not built yet'})")
    start = time.perf_counter()
    try:
        module = build.build_extension(verbose=args.verbose)
    except Exl2Error as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    functions = sorted(name for name in dir(module) if not name.startswith("_"))
    print(f"OK in {time.perf_counter() - start:.1f} s: {module.__file__}")
    print(f"functions: {', '.join(functions)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
