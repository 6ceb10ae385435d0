// Every dmfast op schema lives here; device kernels register their implementations in their own files.
#include <torch/library.h>

TORCH_LIBRARY(dmfast, m) {
  // Bilinear affine warp (affine_grid + grid_sample, align_corners=False, zero padding), then pool x pool average
  // pooling and bilinear restore to the input size; pool == 1 is the plain warp.
  m.def("affine_smooth(Tensor images, Tensor theta, int pool) -> Tensor");
  // output_mask = (images needs grad, theta needs grad); a gradient not asked for comes back as an empty tensor.
  m.def(
      "affine_smooth_backward(Tensor grad_output, Tensor images, Tensor theta, int pool, bool[2] output_mask)"
      " -> (Tensor, Tensor)");
}
