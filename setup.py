"""Build of dmfast's C++/CUDA extension (metadata lives in pyproject.toml).

``dmfast._C`` holds the op schemas, the Python module and the CUDA kernels; the CPU kernels are built once per x86
instruction set into ``dmfast._cpu_<variant>`` libraries (``base``: x86-64-v2, ``avx2``: x86-64-v3, ``avx512``:
x86-64-v4), of which ``dmfast.ops`` loads the best the CPU runs (``DMFAST_CPU_VARIANT`` forces one). No build uses
``-march=native``: one build runs on every x86-64-v2 machine. ``DMFAST_CPU_VARIANTS`` (comma-separated) limits the
variants built; other machines build one ``base`` variant with the compiler's defaults.

CUDA kernels are built when DMFAST_CUDA=1, or when DMFAST_CUDA is unset and torch sees a GPU; DMFAST_CUDA=0 turns
them off. Set CUDA_HOME to the toolkit root and TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to compile them on a machine
without a GPU.
"""

import ast
import glob
import os
import platform
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("DMFAST_CUDA", "")
    if flag in ("0", "1"):
        return flag == "1"
    return torch.cuda.is_available()


def openmp_flags() -> list[str]:
    # at::parallel_for expands to OpenMP pragmas in our own translation units when torch uses OpenMP.
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []


def _constant(path: Path, name: str):
    """The literal value assigned to ``name`` in the Python file ``path`` (read, not imported: the package is not
    built yet)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path}: no {name} = ...")


# The CPU variants and their flags, narrowest first: dmfast/cpu_variants.py owns the list (it loads them).
X86_VARIANTS = _constant(Path(HERE) / "dmfast" / "cpu_variants.py", "COMPILE_FLAGS")


def cpu_variants() -> dict:
    """name -> extra flags of the CPU kernel libraries to build."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"base": []}
    wanted = [v.strip() for v in os.environ.get("DMFAST_CPU_VARIANTS", ",".join(X86_VARIANTS)).split(",") if v.strip()]
    unknown = [v for v in wanted if v not in X86_VARIANTS]
    if unknown or not wanted:
        raise SystemExit(f"DMFAST_CPU_VARIANTS: {unknown or 'none'} not among {', '.join(X86_VARIANTS)}")
    return {v: X86_VARIANTS[v] for v in X86_VARIANTS if v in wanted}


def variant_sources(name: str, sources: list) -> list:
    """Per-variant copies of the kernel sources' names (one #include each) so that every variant's objects have
    their own paths in the shared build folder."""
    folder = os.path.join("build", "cpu-variants", name)
    os.makedirs(folder, exist_ok=True)
    out = []
    for source in sources:
        path = os.path.join(folder, os.path.basename(source))
        text = f'#include "{os.path.join(HERE, source)}"  // compiled for the {name} CPU variant\n'
        if not os.path.exists(path) or open(path).read() != text:  # unchanged: ninja keeps the object
            with open(path, "w") as f:
                f.write(text)
        out.append(path)
    return out


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    shared = rel("csrc/attention_cam_op.cpp")  # the attention head's passes, used by the CPU and CUDA kernels
    main = rel("csrc/*.cpp")
    cxx = ["-O3", "-std=c++20"] + openmp_flags()
    if want_cuda():
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DDMFAST_WITH_CUDA"]
        modules = [CUDAExtension("dmfast._C", main + rel("csrc/cuda/*.cu"),
                                 extra_compile_args={"cxx": cxx + ["-DDMFAST_WITH_CUDA"], "nvcc": nvcc},
                                 extra_link_args=openmp_flags())]
    else:
        modules = [CppExtension("dmfast._C", main, extra_compile_args={"cxx": cxx}, extra_link_args=openmp_flags())]
    for name, flags in cpu_variants().items():
        sources = variant_sources(name, rel("csrc/cpu/*.cpp") + shared)
        modules.append(CppExtension(f"dmfast._cpu_{name}", sources, extra_compile_args={"cxx": cxx + flags},
                                    extra_link_args=openmp_flags()))
    return modules


# An in-place build leaves no kernels of variants it no longer builds (they would be loaded).
if "--inplace" in sys.argv or "-i" in sys.argv:
    for stale in glob.glob(os.path.join(HERE, "dmfast", "_cpu_*.so")):
        if os.path.basename(stale).split(".")[0][len("_cpu_"):] not in cpu_variants():
            os.remove(stale)

setup(
    packages=["dmfast", "dmfast.data", "dmfast.eval", "dmfast.cli"],  # tests/test_architecture.py checks the list
    package_dir={"dmfast": "dmfast", "dmfast.cli": "cli"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
