"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, GPU architectures).

The extension is optional: ``load_extension`` returns None (with one stderr line saying why) whenever it
cannot be used, and every caller then takes the PyTorch reference path. Compilation happens once per
cache key; later processes only load the built library.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from exl2core.errors import Exl2Error

EXTENSION_NAME = "exl2core_kernels"
#: The extension's kernels, by binding name (each self-checked before use: ``selfcheck``).
KERNELS = ("quantize_rows", "grid_errors", "pack_codes", "unpack_codes", "dequantize", "exl2_matmul")
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
#: Setting this to 1 forces the PyTorch reference path even where the kernels could be built.
DISABLE_ENV = "EXL2_NO_KERNELS"
#: No -std flag: torch's own default (C++17 or C++20 depending on the version) must be used; no fast-math
#: either: the kernels rely on IEEE division and rounding to match the reference bit for bit.
_NVCC_FLAGS = ["-O3"]
_CXX_FLAGS = ["-O3"]


@dataclass
class LoadResult:
    """Outcome of the first ``load_extension`` call: the module, or None and the reason."""

    module: ModuleType | None
    reason: str = ""


_lock = threading.Lock()
_result: LoadResult | None = None


def sources() -> list[Path]:
    """The extension's translation units (bindings and kernels)."""
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".cu"))


def arch_list() -> str:
    """GPU architectures to compile for: ``$TORCH_CUDA_ARCH_LIST``, else those of the visible devices."""
    explicit = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if explicit:
        return explicit
    if not torch.cuda.is_available():
        return ""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def cache_root() -> Path:
    """``$EXL2_CACHE/kernels`` if set, else ``~/.cache/exl2core/kernels``."""
    base = os.environ.get("EXL2_CACHE") or Path.home() / ".cache" / "exl2core"
    return Path(base) / "kernels"


def build_dir() -> Path:
    """The cache directory of this (torch version, CUDA version, architecture list)."""
    arches = re.sub(r"[^0-9A-Za-z.+]+", "_", arch_list()) or "none"
    key = f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}-sm{arches}"
    return cache_root() / re.sub(r"[^0-9A-Za-z.+_-]+", "_", key)


def is_built() -> bool:
    """Whether the cache holds a library at least as new as every source file."""
    library = build_dir() / f"{EXTENSION_NAME}.so"
    if not library.is_file():
        return False
    newest_source = max(p.stat().st_mtime for p in SOURCE_DIR.iterdir())
    return library.stat().st_mtime >= newest_source


def library_header_dirs(toolkit: Path) -> list[str]:
    """Include dirs of the CUDA library headers (cuBLAS, cuSPARSE, cuSOLVER) that torch's CUDA headers
    need, taken from pip's ``nvidia-*`` wheels when a minimal toolkit (nvcc + cudart only) lacks them."""
    if (toolkit / "include" / "cusparse.h").is_file():
        return []
    found = {str(d) for entry in sys.path if entry and Path(entry).is_dir()
             for d in Path(entry).glob("nvidia/*/include") if (d / "cusparse.h").is_file()}
    return sorted(found)


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile (if needed) and import the extension; raises Exl2Error saying what failed.

    Works without a visible GPU when ``TORCH_CUDA_ARCH_LIST`` names the target architectures.
    """
    if torch.version.cuda is None:
        raise Exl2Error(f"torch {torch.__version__} is a CPU-only build")
    arches = arch_list()
    if not arches:
        raise Exl2Error("no CUDA device is visible and TORCH_CUDA_ARCH_LIST is not set")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise Exl2Error("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME not set)")
    toolkit = Path(cpp_extension.CUDA_HOME)
    if not (toolkit / "include" / "cuda_runtime.h").is_file():
        raise Exl2Error(f"CUDA_HOME={toolkit} has no include/cuda_runtime.h; set CUDA_HOME to the CUDA "
                        f"toolkit root (e.g. /usr/local/cuda)")
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not is_built():
        print("compiling exl2core CUDA kernels (once, ~1–2 min)...", file=sys.stderr, flush=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arches
    try:
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(p) for p in sources()],
            extra_cflags=_CXX_FLAGS,
            extra_cuda_cflags=_NVCC_FLAGS,
            extra_include_paths=[str(SOURCE_DIR), *library_header_dirs(toolkit)],
            build_directory=str(directory),
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        raise Exl2Error(f"building the CUDA kernels failed: {_first_error(str(e))}") from e
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _first_error(log: str) -> str:
    """The compiler's first error line of a build log (else its last line), for a one-line message."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("Error building")]
    return (errors or lines or ["unknown error"])[0 if errors else -1][:300]


def disabled_reason() -> str:
    """Why the kernels cannot be used in this process before trying a build ('' if they may be)."""
    if os.environ.get(DISABLE_ENV, "") == "1":
        return f"{DISABLE_ENV}=1"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return ""


def _load() -> LoadResult:
    reason = disabled_reason()
    if not reason:
        try:
            return LoadResult(build_extension())
        except Exl2Error as e:
            reason = str(e)
            print(f"exl2core: CUDA kernels {', '.join(KERNELS)} disabled ({reason}); using the PyTorch path",
                  file=sys.stderr, flush=True)
            return LoadResult(None, reason)
    print(f"exl2core: CUDA kernels not used ({reason}); using the PyTorch path", file=sys.stderr, flush=True)
    return LoadResult(None, reason)


def load_extension() -> ModuleType | None:
    """The compiled extension, or None (one stderr line per process) when it cannot be used."""
    global _result
    decided = _result
    if decided is not None:  # hot path: the quantizer asks once per row
        return decided.module
    with _lock:
        if _result is None:
            _result = _load()
        return _result.module


def load_result() -> LoadResult | None:
    """The cached outcome of ``load_extension``, None if it was not called yet."""
    return _result


def reset() -> None:
    """Forget the cached outcome so the next ``load_extension`` decides again (tests, after env changes)."""
    global _result
    with _lock:
        _result = None
