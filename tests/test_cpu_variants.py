"""The CPU kernels' per-instruction-set builds (dmfast.cpu_variants): the widest one this CPU runs is loaded, a forced
one is checked, and every variant built and run by this CPU passes the ops' tests against their references (each in
its own process: a process loads one variant)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmfast import cpu_variants

ROOT = Path(__file__).resolve().parents[1]
OP_TESTS = ["tests/test_affine_smooth.py", "tests/test_cam_boxes.py", "tests/test_mask_attention.py",
            "tests/test_attention_cam.py"]
RUNNABLE = [v for v in cpu_variants.built() if cpu_variants.supported(v)]


def test_the_widest_variant_this_cpu_runs_is_loaded():
    if os.environ.get(cpu_variants.FORCE):
        assert cpu_variants.loaded() == os.environ[cpu_variants.FORCE]
    else:
        assert cpu_variants.loaded() == RUNNABLE[-1]
    assert "base" in cpu_variants.built()  # every build has the portable one


def test_levels_include_the_ones_below(monkeypatch):
    monkeypatch.setattr(cpu_variants, "_cpu_flags", lambda: cpu_variants.FLAGS["base"] | cpu_variants.FLAGS["avx512"])
    assert cpu_variants.supported("base") and not cpu_variants.supported("avx2")
    assert not cpu_variants.supported("avx512")  # AVX-512 flags without AVX2's: not x86-64-v4
    monkeypatch.setattr(cpu_variants, "_cpu_flags", lambda: set().union(*cpu_variants.FLAGS.values()))
    assert all(cpu_variants.supported(v) for v in cpu_variants.VARIANTS)
    with pytest.raises(ValueError, match="CPU variant must be one of base, avx2, avx512"):
        cpu_variants.supported("sse2")


def test_a_forced_variant_is_checked(monkeypatch):
    monkeypatch.setattr(cpu_variants, "built", lambda: {"base": Path("x.so"), "avx2": Path("y.so")})
    monkeypatch.setattr(cpu_variants, "_cpu_flags", lambda: cpu_variants.FLAGS["base"])
    assert cpu_variants.choose() == "base"
    with pytest.raises(ImportError, match="DMFAST_CPU_VARIANT='avx3': not a CPU variant"):
        cpu_variants.choose("avx3")
    with pytest.raises(ImportError, match="this build has no avx512 kernels .built: base, avx2"):
        cpu_variants.choose("avx512")
    with pytest.raises(ImportError, match="DMFAST_CPU_VARIANT=avx2: this CPU lacks its instructions"):
        cpu_variants.choose("avx2")


@pytest.mark.parametrize("variant", [v for v in cpu_variants.VARIANTS if v in RUNNABLE and v != cpu_variants.loaded()])
def test_every_other_variant_passes_the_op_tests(variant):
    """The process running this suite tests the loaded variant; each other one runs the ops' tests (against the
    float64 references, gradcheck, opcheck) in a process of its own."""
    env = {**os.environ, cpu_variants.FORCE: variant}
    check = subprocess.run([sys.executable, "-c", "import dmfast; print(dmfast.cpu_variants.loaded())"], env=env,
                           cwd=ROOT, capture_output=True, text=True)
    assert check.stdout.strip() == variant, check.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", *OP_TESTS, "-q", "-x", "-p", "no:cacheprovider", "-k",
                             "not cuda"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
