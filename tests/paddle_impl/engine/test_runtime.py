"""paddle_impl.engine.runtime: which MKL code path is requested, and that the environment is respected."""
import os
import subprocess
import sys

import pytest

from paddle_impl.engine import runtime

from tests.paths import ROOT  # noqa: E402
ZEN4 = frozenset("fpu sse2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512cd avx512bw avx512dq avx512vl".split())
ZEN2 = frozenset("fpu sse2 avx avx2 fma f16c bmi1 bmi2".split())


@pytest.mark.parametrize("vendor, flags, expected", [
    ("AuthenticAMD", ZEN4, runtime.MKL_CPU_TYPE_AVX512),
    ("AuthenticAMD", ZEN2, runtime.MKL_CPU_TYPE_AVX2),
    ("HygonGenuine", ZEN2, runtime.MKL_CPU_TYPE_AVX2),
    ("AuthenticAMD", frozenset({"sse2", "avx"}), None),
    ("GenuineIntel", ZEN4, None),
    ("", ZEN4, None),
])
def test_mkl_cpu_type(vendor, flags, expected):
    assert runtime.mkl_cpu_type(vendor, flags) == expected


def test_read_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu\n")
    assert runtime.read_cpuinfo(str(info)) == ("AuthenticAMD", frozenset({"fpu", "avx2", "fma"}))
    assert runtime.read_cpuinfo(str(tmp_path / "missing")) == ("", frozenset())


def test_configure_cpu_keeps_a_value_already_set():
    env = {"MKL_DEBUG_CPU_TYPE": "5"}
    info = runtime.configure_cpu(environ=env)
    assert env == {"MKL_DEBUG_CPU_TYPE": "5"}
    assert info == {"MKL_DEBUG_CPU_TYPE": "5", "mkl_cpu_type_set": False}


def test_configure_cpu_sets_only_what_this_cpu_calls_for():
    env = {}
    info = runtime.configure_cpu(environ=env)
    expected = runtime.mkl_cpu_type(*runtime.read_cpuinfo()) if sys.platform.startswith("linux") else None
    assert env.get("MKL_DEBUG_CPU_TYPE") == expected
    assert info["mkl_cpu_type_set"] == (expected is not None)


def _mkl_setting_after(code: str) -> str:
    """``MKL_DEBUG_CPU_TYPE`` as a fresh Python process running ``code`` leaves it ("None": unset)."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    out = subprocess.run([sys.executable, "-c", code + "; print(os.environ.get('MKL_DEBUG_CPU_TYPE'))"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def test_train_program_requests_the_mkl_code_path():
    # Run as the program (``python -m paddle_impl.train``), before Paddle's MKL makes its first call.
    code = ("import os, runpy, sys; sys.argv = ['train', '--help']\n"
            "try:\n    runpy.run_module('paddle_impl.train', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "import os")
    assert _mkl_setting_after(code) == str(runtime.mkl_cpu_type(*runtime.read_cpuinfo()))


def test_importing_train_leaves_mkl_alone():
    # Tests and alignment stages import the training module; their numbers must
    # come from MKL's default code path, as the alignment stages measure it.
    assert _mkl_setting_after("import os, paddle_impl.train") == "None"
