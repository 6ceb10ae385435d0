// Shared math of the affine_smooth op, compiled by the CPU and the CUDA kernels alike.
//
// The op is the eager chain
//   interpolate(avg_pool2d(grid_sample(I, affine_grid(theta)), pool), size=(H, W), bilinear)
// with align_corners=False everywhere and zero padding. Every helper here reproduces one step of that chain for
// a single point so the kernels never build the sampling grid or the full-resolution warp.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"
#include "interpolate.h"

namespace dmfast {

// Source pixel coordinates of output pixel (i, j) are affine in (i, j):
//   ix = x_col * j + x_row * i + x0,   iy = y_col * j + y_row * i + y0.
// Folding affine_grid's normalised base grid and grid_sample's unnormalisation into one affine map gives these
// coefficients; they are computed in double once per image so the per-pixel cost is two multiply-adds.
template <typename T>
struct PixelMap {
  T x_col, x_row, x0;
  T y_col, y_row, y0;

  DMFAST_HD T x(int64_t i, int64_t j) const { return x_col * T(j) + (x_row * T(i) + x0); }
  DMFAST_HD T y(int64_t i, int64_t j) const { return y_col * T(j) + (y_row * T(i) + y0); }
};

// theta (row-major 2x3) maps normalised output coordinates (xn, yn) to normalised input coordinates, with
// xn = (2j + 1) / W - 1 and ix = ((gx + 1) W - 1) / 2 for align_corners=False.
template <typename T>
DMFAST_HD PixelMap<T> make_pixel_map(const double* t, int64_t H, int64_t W) {
  const double h = double(H), w = double(W);
  PixelMap<T> m;
  m.x_col = T(t[0]);
  m.x_row = T(t[1] * w / h);
  m.x0 = T(0.5 * w * (t[0] * (1.0 / w - 1.0) + t[1] * (1.0 / h - 1.0) + t[2]) + 0.5 * (w - 1.0));
  m.y_col = T(t[3] * h / w);
  m.y_row = T(t[4]);
  m.y0 = T(0.5 * h * (t[3] * (1.0 / w - 1.0) + t[4] * (1.0 / h - 1.0) + t[5]) + 0.5 * (h - 1.0));
  return m;
}

// d(theta) from the sums over sample points of dL/dix and dL/diy weighted by 1, j and i:
// dL/dt0k = W/2 * sum dL/dix * (xn, yn, 1), and xn, yn are affine in j, i.
template <typename T>
DMFAST_HD void theta_grad_from_moments(const T* m, int64_t H, int64_t W, T* grad) {
  // m = [sum gx, sum gx*j, sum gx*i, sum gy, sum gy*j, sum gy*i]
  const T h = T(H), w = T(W);
  for (int r = 0; r < 2; ++r) {
    const T g = m[3 * r], gj = m[3 * r + 1], gi = m[3 * r + 2];
    const T half = r == 0 ? w / T(2) : h / T(2);
    const T sum_xn = (T(2) * gj + g) / w - g;  // sum g * ((2j + 1) / W - 1)
    const T sum_yn = (T(2) * gi + g) / h - g;
    grad[3 * r + 0] = half * sum_xn;
    grad[3 * r + 1] = half * sum_yn;
    grad[3 * r + 2] = half * g;
  }
}

// The four bilinear corners of a source point: (x0, y0) is the top-left pixel, fx, fy the fractions.
template <typename T>
struct Corners {
  int64_t x0, y0;
  T fx, fy;
};

template <typename T>
DMFAST_HD Corners<T> corners_of(T ix, T iy) {
  const T fx0 = floor(ix), fy0 = floor(iy);
  return Corners<T>{int64_t(fx0), int64_t(fy0), ix - fx0, iy - fy0};
}

// Zero padding: a corner outside the image reads 0.
template <typename T>
DMFAST_HD T value_or_zero(const T* plane, int64_t y, int64_t x, int64_t H, int64_t W) {
  return (y >= 0 && y < H && x >= 0 && x < W) ? plane[y * W + x] : T(0);
}

// The four corners of a sample (top-left, top-right, bottom-left, bottom-right), zero outside the image.
template <typename T, typename scalar_t>
DMFAST_HD void corner_values(const scalar_t* plane, const Corners<T>& c, int64_t H, int64_t W, T* v) {
  v[0] = T(value_or_zero(plane, c.y0, c.x0, H, W));
  v[1] = T(value_or_zero(plane, c.y0, c.x0 + 1, H, W));
  v[2] = T(value_or_zero(plane, c.y0 + 1, c.x0, H, W));
  v[3] = T(value_or_zero(plane, c.y0 + 1, c.x0 + 1, H, W));
}

// d sample / d ix and d sample / d iy of a bilinear sample with (gradient-weighted) corner values v.
template <typename T>
DMFAST_HD void corner_gradient(const T* v, const Corners<T>& c, T* gx, T* gy) {
  *gx = (T(1) - c.fy) * (v[1] - v[0]) + c.fy * (v[3] - v[2]);
  *gy = (T(1) - c.fx) * (v[2] - v[0]) + c.fx * (v[3] - v[1]);
}

// Keeps far out-of-frame coordinates finite and integral-castable; beyond [-2, size + 1] every corner is outside
// the image, so value and gradient stay exactly zero.
template <typename T>
DMFAST_HD T clamp_far(T v, int64_t size) {
  if (!(v > T(-2))) return T(-2);
  if (!(v < T(size + 1))) return T(size + 1);
  return v;
}

// The op's domain: every entry of theta finite and at most kThetaLimit in magnitude. No affine map of an X-ray
// comes near it (the alignment module's are below 2), and beyond it float32 cannot place a sample to within a
// pixel. An image whose theta is outside gets an all-NaN output and NaN gradients; the kernels test it per image
// where they read theta, so no op waits for the device to check its arguments.
constexpr double kThetaLimit = 1e6;

DMFAST_HD bool theta_in_domain(const double* t) {
  bool inside = true;
#if defined(__CUDA_ARCH__)
  for (int k = 0; k < 6; ++k) inside = inside && fabs(t[k]) <= kThetaLimit;  // false for NaN
#else
  for (int k = 0; k < 6; ++k) inside = inside && std::fabs(t[k]) <= kThetaLimit;
#endif
  return inside;
}

// Range of output indices whose restore taps can touch pooled index r (used by the gathering transpose).
DMFAST_HD void restore_source_range(int64_t r, int64_t pool, int64_t out_size, int64_t* lo, int64_t* hi) {
  int64_t a = (r - 1) * pool;
  int64_t b = (r + 2) * pool;
  *lo = a < 0 ? 0 : a;
  *hi = b > out_size ? out_size : b;
}

}  // namespace dmfast
