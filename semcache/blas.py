"""Load the system OpenBLAS before MLX so CPU matmuls do not fall back to reference BLAS.

The mlx-cpu wheel links a reference BLAS that is ~30x slower (../shared/FINDINGS.md §1). Loading
OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported makes its symbols win. This module must stay
import-light: `semcache/__init__.py` imports it first, so every entry point gets the fast path.
"""

import ctypes
import ctypes.util
import platform
import sys

INSTALL_HINT = "apt-get install libopenblas0-pthread"
_CANDIDATES = ("libopenblas.so.0", "libopenblas.so")


def load_openblas() -> str:
    """Load OpenBLAS globally on Linux; return a short description of the BLAS in use."""
    if platform.system() != "Linux":
        return "Accelerate" if platform.system() == "Darwin" else "platform default"
    if "mlx.core" in sys.modules:
        return "unknown (mlx was imported before semcache)"
    names = list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        names.append(found)
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return f"OpenBLAS ({name})"
    return "reference BLAS (slow)"


def is_slow(info: str) -> bool:
    """True when MLX will run on the reference BLAS, so the daemon should warn loudly."""
    return info.startswith("reference")


BLAS_INFO = load_openblas()
