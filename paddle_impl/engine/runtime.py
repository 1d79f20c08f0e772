"""CPU runtime settings for Paddle, to be applied once per process before Paddle computes.

Why. Paddle's dygraph ``conv2d`` (and its backward, and ``matmul``) on CPU is
``phi::ConvKernelImpl``: im2col followed by an SGEMM of the MKL that the wheel
ships (``paddle/libs/libmklml_intel.so``, Intel MKL 2019.0 Update 5). That MKL
selects its kernels by CPU vendor: on a non-Intel CPU (AMD EPYC here, which has
AVX2 and AVX-512) it runs its generic code path (``mkl_blas_def_sgemm_*`` in
``perf``), about 3x slower than its AVX2/AVX-512 kernels. torch is not affected:
it convolves with oneDNN and ships a recent MKL. ``FLAGS_use_mkldnn`` /
``FLAGS_use_onednn`` do not change this: in dygraph the conv2d kernel key stays
``[CPU, NCHW, float32]`` (``GLOG_v=6``) and no oneDNN primitive of Paddle runs.

That MKL release reads ``MKL_DEBUG_CPU_TYPE`` to override the vendor-based
dispatch: 7 selects its AVX-512 (Skylake-SP) kernels, 5 its AVX2 kernels. The
override is only set on non-Intel x86 CPUs that have the instructions the code
path needs (on Intel CPUs MKL already dispatches by features), and never over
a value already in the environment. It changes which MKL kernels run: SGEMM
results differ from the generic path within float32 rounding (summation
order), like any change of BLAS kernel or thread count, and Paddle's float32
division, which goes through MKL's vector math, is then no longer correctly
rounded (about 3 in 1000 quotients one unit in the last place off, measured
on uniform random operands). So only the programs that train or time
training apply it (``python -m paddle_impl.train`` and the benchmarks); the
alignment stages and the tests compare numbers on MKL's default path.

When. MKL reads the variable once, at its first BLAS call; the process
environment must hold it before that. Calling :func:`configure_cpu` before
``import paddle`` is the safe order (it does not import Paddle unless
``threads`` is given).
"""
from __future__ import annotations

import os
import platform
import sys

MKL_CPU_TYPE_AVX2 = "5"
MKL_CPU_TYPE_AVX512 = "7"

# What MKL 2019's AVX2 and AVX-512 (Skylake-SP) code paths execute.
_AVX2_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2"})
_AVX512_FLAGS = _AVX2_FLAGS | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(vendor id, CPU flags) of the first processor listed, or ("", {}) when unknown."""
    vendor, flags = "", frozenset()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor, flags


def mkl_cpu_type(vendor: str, flags: frozenset[str]) -> str | None:
    """The ``MKL_DEBUG_CPU_TYPE`` that lets MKL use this CPU's vector units, or None to leave MKL alone."""
    if not vendor or vendor == "GenuineIntel":
        return None
    if _AVX512_FLAGS <= flags:
        return MKL_CPU_TYPE_AVX512
    if _AVX2_FLAGS <= flags:
        return MKL_CPU_TYPE_AVX2
    return None


def configure_cpu(threads: int | None = None, *, environ=None) -> dict:
    """Apply the CPU settings described in the module docstring; returns what was decided.

    ``threads``: when a positive number, Paddle's math threads are set to it
    (``paddle.base.core.set_num_threads``; Paddle's default is 1). None leaves
    the count alone and does not import Paddle.
    """
    env = os.environ if environ is None else environ
    info: dict = {"MKL_DEBUG_CPU_TYPE": env.get("MKL_DEBUG_CPU_TYPE"), "mkl_cpu_type_set": False}
    if "MKL_DEBUG_CPU_TYPE" not in env and sys.platform.startswith("linux") \
            and platform.machine() in ("x86_64", "AMD64"):
        cpu_type = mkl_cpu_type(*read_cpuinfo())
        if cpu_type is not None:
            env["MKL_DEBUG_CPU_TYPE"] = cpu_type
            info.update(MKL_DEBUG_CPU_TYPE=cpu_type, mkl_cpu_type_set=True)
    if threads is not None and threads > 0:
        import paddle

        paddle.base.core.set_num_threads(threads)
        info["paddle_num_threads"] = threads
    return info
