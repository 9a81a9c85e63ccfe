"""What ``exl2 doctor`` reports: torch, CUDA devices, compilers and the state of the kernel build.

Each check is read-only except the last: with a usable CUDA device the kernels are loaded (compiled
first if the cache lacks them) and self-checked, since "loadable" and "correct" are only known by trying.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch

from exl2core.kernels import build, selfcheck


def toolkit_home() -> Path | None:
    """The CUDA toolkit torch's extension builder will use (same search order: env, nvcc, default)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    default = Path("/usr/local/cuda")
    return default if default.is_dir() else None


def _version_line(command: list[str], marker: str = "") -> str:
    """The first line of ``command``'s output containing ``marker`` (any line when empty)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not runnable ({e})"
    lines = [line.strip() for line in done.stdout.splitlines() if marker in line and line.strip()]
    if done.returncode != 0 or not lines:
        return f"not runnable (exit {done.returncode})"
    return lines[0]


def _nvcc(home: Path | None) -> str:
    bundled = home / "bin" / "nvcc" if home is not None else None
    path = str(bundled) if bundled is not None and bundled.is_file() else shutil.which("nvcc")
    if path is None:
        return "not found"
    return f"{path} ({_version_line([path, '--version'], marker='release')})"


def _compiler() -> str:
    name = os.environ.get("CXX") or "c++"
    path = shutil.which(name)
    return f"{path} ({_version_line([path, '--version'])})" if path else f"{name}: not found"


def _devices() -> str:
    if not torch.cuda.is_available():
        return "none"
    names = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        names.append(f"{i}: {torch.cuda.get_device_name(i)} (sm {major}.{minor})")
    return "; ".join(names)


def _toolkit(home: Path | None) -> str:
    if home is None:
        return "not found"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return f"{home} (no include/cuda_runtime.h: set CUDA_HOME to the toolkit root)"
    return str(home)


def _kernel_status() -> tuple[str, selfcheck.CheckedExtension | None]:
    """The extension's state, and the checked extension when it loaded (its kernels self-checked)."""
    reason = build.disabled_reason()
    if reason == f"{build.DISABLE_ENV}=1":
        return f"forced off ({reason})", None
    if reason:
        return f"not used ({reason}; the PyTorch path runs)", None
    checked = selfcheck.checked_extension()
    if checked is not None:
        usable = sum(state.usable for state in checked.states.values())
        return f"loaded ({usable} of {len(checked.states)} kernels passed their self-check)", checked
    result = build.load_result()
    return f"failed ({result.reason if result else 'unknown'}; the PyTorch path runs)", None


def kernel_lines(checked: selfcheck.CheckedExtension | None) -> list[tuple[str, str]]:
    """One (field, value) per kernel: in use with what its self-check showed, or why the PyTorch path runs."""
    lines = []
    for name in selfcheck.KERNELS:
        state = checked.states.get(name) if checked is not None else None
        if state is None:
            value = "PyTorch path (extension not loaded)"
        elif state.usable:
            value = f"in use ({state.detail})"
        else:
            value = f"disabled, PyTorch path ({state.detail})"
        lines.append((f"  {name}", value))
    return lines


def environment_report() -> list[tuple[str, str]]:
    """(field, value) pairs in display order."""
    home = toolkit_home()
    cuda_build = torch.version.cuda
    arches = build.arch_list()
    status, checked = _kernel_status()
    return [
        ("torch", f"{torch.__version__} ({f'CUDA {cuda_build} build' if cuda_build else 'CPU-only build'})"),
        ("CUDA available", "yes" if torch.cuda.is_available() else "no"),
        ("CUDA devices", _devices()),
        ("CUDA toolkit", _toolkit(home)),
        ("nvcc", _nvcc(home)),
        ("C++ compiler", _compiler()),
        ("ninja", _version_line(["ninja", "--version"]) if shutil.which("ninja") else "not found"),
        ("kernel archs", arches or "none (no device visible; set TORCH_CUDA_ARCH_LIST to build anyway)"),
        ("kernel cache", f"{build.build_dir()} ({'built' if build.is_built() else 'not built'})"),
        ("kernels", status),
        *kernel_lines(checked),
    ]
