// Linear interpolation taps of ATen's upsampling (interpolate, align_corners=False), shared by the affine_smooth
// restore and the cam_boxes upsampling on CPU and CUDA.
#pragma once

#include <cstdint>

#include "common.h"

namespace dmfast {

// Output index dst reads lambda0 * in[i0] + lambda1 * in[i1].
template <typename T>
struct LinearTap {
  int64_t i0, i1;
  T lambda0, lambda1;
};

// ATen's source-index rule: src = scale * (dst + 0.5) - 0.5, clamped at 0, with scale = in_size / out_size in T
// (ATen's precision: the op's for the affine_smooth restore, double for cam_boxes). Loops pass scale in once.
template <typename T>
DMFAST_HD LinearTap<T> linear_tap(int64_t dst, int64_t in_size, T scale) {
  T src = scale * (T(dst) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  const int64_t i0 = int64_t(src);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const T lambda1 = src - T(i0);
  return LinearTap<T>{i0, i1, T(1) - lambda1, lambda1};
}

// Output index dst of an upsampling from in_size to out_size.
template <typename T>
DMFAST_HD LinearTap<T> upsample_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  return linear_tap<T>(dst, in_size, T(in_size) / T(out_size));
}

}  // namespace dmfast
