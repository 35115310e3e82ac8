"""BLAS set-up: OpenBLAS is loaded, and its kernel family follows the CPU unless the user chose one."""

import os
import subprocess
import sys

import pytest

from semcache.engine.blas import kernel_family


def test_kernel_family_from_flags():
    """AVX-512 → SkylakeX, AVX2+FMA → Haswell, older CPUs are left to OpenBLAS."""
    assert kernel_family({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}) == "SkylakeX"
    assert kernel_family({"avx2", "fma", "avx512f"}) == "Haswell"
    assert kernel_family({"sse3", "avx"}) is None


def blas_info(env: dict) -> str:
    code = "import semcache; print(semcache.BLAS_INFO)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60).stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS is loaded on Linux only")
def test_existing_coretype_is_respected():
    """A user's OPENBLAS_CORETYPE wins over the choice from CPU flags."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    info = blas_info({**env, "OPENBLAS_CORETYPE": "Haswell"})
    assert info.startswith("OpenBLAS") and "Haswell kernels" in info and "chosen" not in info
