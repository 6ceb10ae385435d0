// The Python module dmfast._C. Loading it registers the ops with the dispatcher; it also reports how the
// extension was built. The only translation unit that includes pybind11.
#include <pybind11/pybind11.h>

#include <string>

namespace {

bool built_with_cuda() {
#ifdef DMFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dmfast C++/CUDA ops (registered under torch.ops.dmfast)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build");
  m.def("built_with_openmp", &built_with_openmp, "Whether the CPU kernels were compiled with OpenMP");
}
