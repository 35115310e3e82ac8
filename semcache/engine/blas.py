"""Load the system OpenBLAS before MLX so CPU matmuls do not fall back to reference BLAS.

Two traps, both measured on the project's Linux machines (2 Xeon cores with AVX-512):
- The mlx-cpu wheel links a reference BLAS that is ~30x slower (see docs/DESIGN.md, "CPU facts"). Loading
  OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported makes its symbols win.
- Debian's OpenBLAS 0.3.21 (DYNAMIC_ARCH) does not recognise this CPU model and falls back to its
  SSE3 "Prescott" kernels: sgemm at ~67 GFLOP/s instead of ~330 with its SkylakeX kernels. When
  OPENBLAS_CORETYPE is unset we choose the kernel family from the CPU's feature flags; a value
  already in the environment is always respected.

This module must stay import-light: `semcache/__init__.py` imports it first, so every entry point
(daemon, tests, perf) gets the same BLAS.
"""

import ctypes
import ctypes.util
import os
import platform
import sys

INSTALL_HINT = "apt-get install libopenblas0-pthread"
_CANDIDATES = ("libopenblas.so.0", "libopenblas.so")
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_family(flags: set[str]) -> str | None:
    """The OpenBLAS core type these CPU flags support best, or None to let OpenBLAS decide."""
    if _AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def load_openblas() -> str:
    """Load OpenBLAS globally on Linux; return a short description of the BLAS in use."""
    if platform.system() != "Linux":
        return "Accelerate" if platform.system() == "Darwin" else "platform default"
    if "mlx.core" in sys.modules:
        return "unknown (mlx was imported before semcache)"
    chosen = None
    if "OPENBLAS_CORETYPE" not in os.environ:
        chosen = kernel_family(cpu_flags())
        if chosen:
            os.environ["OPENBLAS_CORETYPE"] = chosen  # read by OpenBLAS when it loads, just below
    names = list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        names.append(found)
    for name in names:
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return f"OpenBLAS ({name}, {_core_name(lib)} kernels{', chosen from CPU flags' if chosen else ''})"
    return "reference BLAS (slow)"


def _core_name(lib: ctypes.CDLL) -> str:
    try:
        get = lib.openblas_get_corename
    except AttributeError:
        return "unknown"
    get.restype = ctypes.c_char_p
    return get().decode()


def is_slow(info: str) -> bool:
    """True when MLX will run on the reference BLAS, so the daemon should warn loudly."""
    return info.startswith("reference")


BLAS_INFO = load_openblas()
