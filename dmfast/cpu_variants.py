"""The CPU kernels' builds per x86 instruction set, and the choice among them at import.

The build compiles the CPU kernels once per variant into ``dmfast/_cpu_<variant>`` libraries (setup.py):
``base`` for x86-64-v2 (SSE4.2), ``avx2`` for x86-64-v3 (AVX2, FMA), ``avx512`` for x86-64-v4 (AVX-512 F/BW/CD/DQ/VL).
Importing dmfast loads the widest variant that was built and that this CPU runs; ``DMFAST_CPU_VARIANT=<name>`` forces
one (tests and benchmarks run each in turn). Only one variant can be loaded in a process: they register the same
kernels.
"""

import os
from pathlib import Path

import torch

from .errors import SettingsError

# The variants, narrowest first, with their kernels' compiler flags: setup.py builds one library per entry (it
# reads this dict from this file, so the list is written once).
COMPILE_FLAGS = {
    "base": ["-march=x86-64-v2"],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
}
VARIANTS = tuple(COMPILE_FLAGS)
# The /proc/cpuinfo flags each x86-64 micro-architecture level needs (the compilers' -march=x86-64-vN).
FLAGS = {
    "base": {"sse4_2", "ssse3", "popcnt", "cx16"},
    "avx2": {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
# torch's own detection where /proc/cpuinfo is not there
TORCH_CAPABILITY = {"base": ("DEFAULT", "AVX2", "AVX512"), "avx2": ("AVX2", "AVX512"), "avx512": ("AVX512",)}
FORCE = "DMFAST_CPU_VARIANT"
# Native bf16 arithmetic (AVX512-BF16 dot products, AMX tiles): where bf16 inference runs faster than float32.
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
FORCE_BF16 = "DMFAST_CPU_BF16"

_loaded = None


def built() -> dict:
    """variant -> its library file, for the variants this build has."""
    folder = Path(__file__).resolve().parent
    found = {}
    for variant in VARIANTS:
        files = sorted(folder.glob(f"_cpu_{variant}.*so")) + sorted(folder.glob(f"_cpu_{variant}.*pyd"))
        if files:
            found[variant] = files[0]
    return found


def _cpu_flags() -> set | None:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return None


def supported(variant: str) -> bool:
    """Whether this CPU runs ``variant`` (each level includes the ones below it)."""
    if variant not in VARIANTS:
        raise SettingsError(f"CPU variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return variant == "base"  # built with the compiler's defaults there
    flags = _cpu_flags()
    levels = VARIANTS[:VARIANTS.index(variant) + 1]
    if flags is not None:
        return all(FLAGS[level] <= flags for level in levels)
    return torch.backends.cpu.get_cpu_capability() in TORCH_CAPABILITY[variant]


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16), which makes precision "auto" infer in
    bf16 on it. ``DMFAST_CPU_BF16=0`` or ``1`` overrides the detection (the tests set 0, so that "auto" means float32
    on every CI machine)."""
    forced = os.environ.get(FORCE_BF16)
    if forced:
        if forced not in ("0", "1"):
            raise SettingsError(f"{FORCE_BF16}={forced!r}: give 0 or 1")
        return forced == "1"
    return bool(BF16_FLAGS & (_cpu_flags() or set()))


def choose(forced: str | None = None) -> str:
    """The variant to load: ``forced`` (checked: known, built, run by this CPU), else the widest built one this
    CPU runs."""
    have = built()
    if forced:
        if forced not in VARIANTS:
            raise ImportError(f"{FORCE}={forced!r}: not a CPU variant ({', '.join(VARIANTS)})")
        if forced not in have:
            raise ImportError(f"{FORCE}={forced}: this build has no {forced} kernels (built: "
                              f"{', '.join(have) or 'none'}; see DMFAST_CPU_VARIANTS in setup.py)")
        if not supported(forced):
            raise ImportError(f"{FORCE}={forced}: this CPU lacks its instructions ({', '.join(sorted(FLAGS[forced]))})")
        return forced
    usable = [v for v in VARIANTS if v in have and supported(v)]
    if not usable:
        raise ImportError(f"no CPU kernels of dmfast this CPU runs (built: {', '.join(have) or 'none'}): rebuild "
                          "dmfast (pip install -e . or make build)")
    return usable[-1]


def load() -> str:
    """Load the chosen variant's kernels (once per process); returns its name."""
    global _loaded
    if _loaded is None:
        variant = choose(os.environ.get(FORCE) or None)
        torch.ops.load_library(str(built()[variant]))
        _loaded = variant
    return _loaded


def loaded() -> str | None:
    """The CPU variant whose kernels this process runs (None before :func:`load`)."""
    return _loaded
