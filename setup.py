"""Build of dmfast's C++/CUDA extension (metadata lives in pyproject.toml).

The CPU kernels are always built, for this machine's CPU unless DMFAST_CPU_ARCH says otherwise. CUDA kernels are built when DMFAST_CUDA=1, or when DMFAST_CUDA is unset and
torch sees a GPU; DMFAST_CUDA=0 turns them off. Set CUDA_HOME to the toolkit root and TORCH_CUDA_ARCH_LIST
(e.g. "8.0;9.0") to compile them on a machine without a GPU.
"""

import glob
import os
import platform

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


def cpu_arch_flags() -> list[str]:
    # The kernels are built on the machine that runs them, so by default they use its whole vector ISA (the hot
    # loops vectorise into gathers). DMFAST_CPU_ARCH picks another -march (e.g. x86-64-v3); "none" drops it.
    arch = os.environ.get("DMFAST_CPU_ARCH", "native")
    if arch == "none":
        return []
    flags = [f"-march={arch}"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")
    return flags


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20"] + cpu_arch_flags() + openmp_flags()
    if want_cuda():
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DDMFAST_WITH_CUDA"]
        return CUDAExtension(
            "dmfast._C",
            sources + rel("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DDMFAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=openmp_flags(),
        )
    return CppExtension("dmfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp_flags())


setup(
    packages=["dmfast", "dmfast.data", "dmfast.cli"],
    package_dir={"dmfast": "dmfast", "dmfast.cli": "cli"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
