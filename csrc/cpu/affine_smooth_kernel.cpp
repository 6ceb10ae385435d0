// CPU kernels of dmfast::affine_smooth and its backward.
//
// Forward: each pooled cell is the mean of its pool x pool bilinear samples, computed straight from the affine
// map (no grid, no full-resolution warp), then the bilinear restore writes the output row by row.
// Backward: the transposed restore gathers grad_output into pooled cells; the sample loop then turns each cell's
// gradient into moments for theta and, when asked, scatters into the image gradient. Every parallel task owns its
// outputs and partial sums are reduced in a fixed order, so results do not depend on the thread count.
#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../affine_smooth.h"
#include "../checks.h"
#include "warp_rows.h"

namespace dmfast {
namespace {

// Samples of output row i with all four corners inside the image form one interval of j (the coordinates are
// affine in j), and so do those with any corner inside. row_span returns the first, shrunk by the worst rounding of
// the sample loops, so the fast loops need no bounds checks (inside = true), or the second, widened by it
// (inside = false): the samples beyond it read nothing, so their values and gradients are exactly zero.
template <typename T>
inline std::pair<int64_t, int64_t> row_span(const PixelMap<T>& map, int64_t i, int64_t H, int64_t W, bool inside) {
  double lo = 0, hi = double(W - 1);
  // base_terms: the largest magnitude the loops meet while computing base (row term plus offset, unrounded).
  const auto clip = [&](double slope, double base, double base_terms, double size) {
    // The loops compute slope * j + base in T: allow for its rounding at the largest term, plus a small margin.
    const double err = 1e-3 + 8 * double(std::numeric_limits<T>::epsilon()) *
                                  (std::abs(slope) * double(W) + std::abs(base_terms) + size);
    // need v_lo <= slope * j + base <= v_hi
    const double v_lo = inside ? err : -1 - err, v_hi = inside ? size - 1 - err : size + err;
    if (slope == 0) {
      if (base < v_lo || base > v_hi) lo = 1, hi = 0;
      return;
    }
    double j0 = (v_lo - base) / slope, j1 = (v_hi - base) / slope;
    if (j0 > j1) std::swap(j0, j1);
    lo = std::max(lo, j0), hi = std::min(hi, j1);
  };
  const double x_row = double(map.x_row) * double(i), y_row = double(map.y_row) * double(i);
  clip(double(map.x_col), x_row + double(map.x0), std::abs(x_row) + std::abs(double(map.x0)), double(W));
  clip(double(map.y_col), y_row + double(map.y0), std::abs(y_row) + std::abs(double(map.y0)), double(H));
  if (!(lo <= hi)) return {0, 0};
  // One sample of slack each side.
  const int64_t begin = inside ? int64_t(std::ceil(lo)) + 1 : std::max<int64_t>(int64_t(std::floor(lo)) - 1, 0);
  const int64_t end = inside ? int64_t(std::floor(hi)) : std::min<int64_t>(int64_t(std::floor(hi)) + 2, W);
  return begin < end ? std::make_pair(begin, end) : std::make_pair<int64_t, int64_t>(0, 0);
}

// Both spans of output row i (see row_span): inside, the samples read without bounds checks; reach, those that read
// any pixel.
struct RowSpans {
  int64_t inside_begin, inside_end, reach_begin, reach_end;
};

template <typename T>
inline RowSpans row_spans(const PixelMap<T>& map, int64_t i, int64_t H, int64_t W) {
  const auto [inside_begin, inside_end] = row_span(map, i, H, W, true);
  const auto [reach_begin, reach_end] = row_span(map, i, H, W, false);
  return {inside_begin, inside_end, reach_begin, reach_end};
}

// Calls fn(inside, j, corners) for samples j in [j_begin, j_end) of row i that read any pixel, with `inside` a
// std::bool_constant telling whether the corners may be read without bounds checks.
template <typename T, typename Fn>
inline void for_each_row_sample(const PixelMap<T>& map, int64_t i, const RowSpans& spans, int64_t j_begin,
                                int64_t j_end, int64_t H, int64_t W, Fn&& fn) {
  const T x_base = map.x_row * T(i) + map.x0, y_base = map.y_row * T(i) + map.y0;
  for (int64_t j = std::max(j_begin, spans.reach_begin); j < std::min(j_end, spans.reach_end); ++j) {
    if (j >= spans.inside_begin && j < spans.inside_end) {
      const T ix = map.x_col * T(j) + x_base, iy = map.y_col * T(j) + y_base;
      const int64_t x0 = int64_t(ix), y0 = int64_t(iy);  // positive here: truncation is floor
      fn(std::true_type{}, j, Corners<T>{x0, y0, ix - T(x0), iy - T(y0)});
    } else {
      const T ix = clamp_far(map.x_col * T(j) + x_base, W), iy = clamp_far(map.y_col * T(j) + y_base, H);
      fn(std::false_type{}, j, corners_of(ix, iy));
    }
  }
}

// Calls fn(j, corners) for the samples of row i that read some pixels but not all four corners inside: the ones
// the inside loops leave out (for_each_row_sample's bounds-checked case; its unchecked one never occurs here).
template <typename T, typename Fn>
inline void for_each_border_sample(const PixelMap<T>& map, int64_t i, const RowSpans& spans, int64_t H, int64_t W,
                                   Fn&& fn) {
  const auto border = [&](auto inside, int64_t j, const Corners<T>& c) {
    if constexpr (!decltype(inside)::value) fn(j, c);
  };
  for_each_row_sample(map, i, spans, 0, spans.inside_begin, H, W, border);
  for_each_row_sample(map, i, spans, spans.inside_end, W, H, W, border);
}

// Inside span of row i: adds the bilinear samples of channels [0, kChannels) to columns[c * W + j]. Written so
// the compiler turns the j loop into vector gathers (32-bit offsets; the caller checked H * W < 2^31).
template <int kChannels, typename scalar_t, typename T>
inline void add_inside_samples(const scalar_t* img, int64_t HW, int64_t W, const PixelMap<T>& map, int64_t i,
                               int64_t j_begin, int64_t j_end, T* columns) {
  const int w = int(W);
  const T x_base = map.x_row * T(i) + map.x0, y_base = map.y_row * T(i) + map.y0;
#pragma omp simd
  for (int j = int(j_begin); j < int(j_end); ++j) {
    const T ix = map.x_col * T(j) + x_base, iy = map.y_col * T(j) + y_base;
    const int x0 = int(ix), y0 = int(iy);
    const T fx = ix - T(x0), fy = iy - T(y0);
    const T w00 = (T(1) - fx) * (T(1) - fy), w01 = fx * (T(1) - fy), w10 = (T(1) - fx) * fy, w11 = fx * fy;
    const int off = y0 * w + x0;
    for (int c = 0; c < kChannels; ++c) {
      const scalar_t* p = img + c * HW;
      columns[c * W + j] +=
          w00 * T(p[off]) + w01 * T(p[off + 1]) + w10 * T(p[off + w]) + w11 * T(p[off + w + 1]);
    }
  }
}

// Inside span of row i: theta moments (see add_moments) of the gradient-weighted image J = sum_c g_c I_c, where
// g[c * W + j] is the gradient of sample j of channel c.
template <int kChannels, typename scalar_t, typename T>
inline void add_inside_moments(const scalar_t* img, int64_t HW, int64_t W, const PixelMap<T>& map, int64_t i,
                               int64_t j_begin, int64_t j_end, const T* g, T* m) {
  const int w = int(W);
  const T x_base = map.x_row * T(i) + map.x0, y_base = map.y_row * T(i) + map.y0;
  T sx = 0, sxj = 0, sy = 0, syj = 0;
#pragma omp simd reduction(+ : sx, sxj, sy, syj)
  for (int j = int(j_begin); j < int(j_end); ++j) {
    const T ix = map.x_col * T(j) + x_base, iy = map.y_col * T(j) + y_base;
    const int x0 = int(ix), y0 = int(iy);
    const T fx = ix - T(x0), fy = iy - T(y0);
    const int off = y0 * w + x0;
    T v00 = 0, v01 = 0, v10 = 0, v11 = 0;
    for (int c = 0; c < kChannels; ++c) {
      const scalar_t* p = img + c * HW;
      const T gc = g[c * W + j];
      v00 += gc * T(p[off]), v01 += gc * T(p[off + 1]), v10 += gc * T(p[off + w]), v11 += gc * T(p[off + w + 1]);
    }
    const T gx = (T(1) - fy) * (v01 - v00) + fy * (v11 - v10);
    const T gy = (T(1) - fx) * (v10 - v00) + fx * (v11 - v01);
    sx += gx, sxj += gx * T(j), sy += gy, syj += gy * T(j);
  }
  m[0] += sx, m[1] += sxj, m[2] += sx * T(i), m[3] += sy, m[4] += syj, m[5] += sy * T(i);
}

// The four corner values of one channel plane at a sample.
template <bool kInside, typename T, typename scalar_t>
inline std::array<T, 4> corner_array(const scalar_t* plane, const Corners<T>& c, int64_t H, int64_t W) {
  if constexpr (kInside) {
    const scalar_t* p = plane + c.y0 * W + c.x0;
    return {T(p[0]), T(p[1]), T(p[W]), T(p[W + 1])};
  } else {
    std::array<T, 4> v;
    corner_values(plane, c, H, W, v.data());
    return v;
  }
}

// An image whose theta is outside the domain (theta_in_domain) is computed with the identity instead (its result
// is then set to NaN), so no NaN or overflowing coordinate ever reaches the unchecked loops.
template <typename T>
std::vector<PixelMap<T>> pixel_maps(const at::Tensor& theta, int64_t H, int64_t W) {
  const at::Tensor t = theta.to(at::kDouble).contiguous();
  const double* data = t.data_ptr<double>();
  constexpr double kIdentity[6] = {1, 0, 0, 0, 1, 0};
  std::vector<PixelMap<T>> maps(t.size(0));
  for (int64_t b = 0; b < t.size(0); ++b) {
    maps[b] = make_pixel_map<T>(theta_in_domain(data + 6 * b) ? data + 6 * b : kIdentity, H, W);
  }
  return maps;
}

// Images whose theta is outside the domain: their outputs and gradients are NaN (see theta_in_domain).
std::vector<int64_t> images_outside_domain(const at::Tensor& theta) {
  const at::Tensor t = theta.to(at::kDouble).contiguous();
  std::vector<int64_t> bad;
  for (int64_t b = 0; b < t.size(0); ++b) {
    if (!theta_in_domain(t.const_data_ptr<double>() + 6 * b)) bad.push_back(b);
  }
  return bad;
}

void fill_nan(at::Tensor& t, const std::vector<int64_t>& images) {
  for (const int64_t b : images) t.select(0, b).fill_(std::numeric_limits<double>::quiet_NaN());
}

template <typename T>
std::vector<LinearTap<T>> restore_taps(int64_t in_size, int64_t out_size) {
  std::vector<LinearTap<T>> taps(out_size);
  for (int64_t d = 0; d < out_size; ++d) taps[d] = upsample_tap<T>(d, in_size, out_size);
  return taps;
}

// Forward, stage 1: pooled[b, c, r, q] = mean of the cell's bilinear samples (the output itself when pool == 1).
// One task per (image, cell row) sums its pool rows of samples per column, then per cell. kChannels > 0 fixes the
// channel count at compile time (all channels share one sample loop); 0 loops over channels.
template <int kChannels, typename scalar_t>
void pooled_warp(const scalar_t* images, const std::vector<PixelMap<at::opmath_type<scalar_t>>>& maps, int64_t B,
                 int64_t C, int64_t H, int64_t W, int64_t pool, scalar_t* pooled) {
  using T = at::opmath_type<scalar_t>;
  const int64_t Hp = H / pool, Wp = W / pool, HW = H * W;
  const T inv_area = T(1) / T(pool * pool);
  at::parallel_for(0, B * Hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> columns(C * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hp, r = task % Hp;
      const scalar_t* img = images + b * C * HW;
      const auto& map = maps[b];
      std::fill(columns.begin(), columns.end(), T(0));
      for (int64_t i = r * pool; i < (r + 1) * pool; ++i) {
        const RowSpans spans = row_spans(map, i, H, W);
        const auto inside_channel = [&](int64_t ch, int64_t j_begin, int64_t j_end) {
          add_inside_samples<1>(img + ch * HW, HW, W, map, i, j_begin, j_end, columns.data() + ch * W);
        };
        const auto inside = [&](int64_t j_begin, int64_t j_end) {
          if constexpr (kChannels > 0) {
            add_inside_samples<kChannels>(img, HW, W, map, i, j_begin, j_end, columns.data());
          } else {
            for (int64_t ch = 0; ch < C; ++ch) inside_channel(ch, j_begin, j_end);
          }
        };
        if constexpr (std::is_same_v<scalar_t, float>) {
          add_row_samples<kChannels>(img, C, H, W, map, i, spans.inside_begin, spans.inside_end, columns.data(),
                                     inside, inside_channel);
        } else {
          inside(spans.inside_begin, spans.inside_end);
        }
        for_each_border_sample(map, i, spans, H, W, [&](int64_t j, const Corners<T>& c) {
          const T w00 = (T(1) - c.fx) * (T(1) - c.fy), w01 = c.fx * (T(1) - c.fy);
          const T w10 = (T(1) - c.fx) * c.fy, w11 = c.fx * c.fy;
          for (int64_t ch = 0; ch < C; ++ch) {
            const auto v = corner_array<false, T>(img + ch * HW, c, H, W);
            columns[ch * W + j] += w00 * v[0] + w01 * v[1] + w10 * v[2] + w11 * v[3];
          }
        });
      }
      for (int64_t ch = 0; ch < C; ++ch) {
        scalar_t* out = pooled + ((b * C + ch) * Hp + r) * Wp;
        const T* col = columns.data() + ch * W;
        for (int64_t q = 0; q < Wp; ++q) {
          T sum = 0;
          for (int64_t k = q * pool; k < (q + 1) * pool; ++k) sum += col[k];
          out[q] = scalar_t(sum * inv_area);
        }
      }
    }
  });
}

// The restore's taps along one axis grouped into runs of outputs that read the same two inputs, so the inner loop
// broadcasts both inputs instead of gathering them.
template <typename T>
struct TapRuns {
  struct Run {
    int64_t begin, end, i0, i1;
  };
  std::vector<Run> runs;
  std::vector<T> lambda0, lambda1;

  TapRuns(int64_t in_size, int64_t out_size) : lambda0(out_size), lambda1(out_size) {
    const auto taps = restore_taps<T>(in_size, out_size);
    for (int64_t d = 0; d < out_size; ++d) {
      lambda0[d] = taps[d].lambda0, lambda1[d] = taps[d].lambda1;
      if (runs.empty() || runs.back().i0 != taps[d].i0 || runs.back().i1 != taps[d].i1) {
        runs.push_back({d, d + 1, taps[d].i0, taps[d].i1});
      } else {
        runs.back().end = d + 1;
      }
    }
  }
};

// Forward, stage 2: bilinear restore of the pooled planes to H x W, in ATen's order: each pooled row restored along
// x once, then every output row a blend of two of those (long contiguous loops; short runs per output row cost
// more than the writes). Tasks are bands of kRestoreBand output rows of one plane.
constexpr int64_t kRestoreBand = 32;

template <typename scalar_t>
void restore(const scalar_t* pooled, int64_t planes, int64_t Hp, int64_t Wp, int64_t H, int64_t W, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const auto ty = restore_taps<T>(Hp, H);
  const TapRuns<T> tx(Wp, W);
  const int64_t bands = (H + kRestoreBand - 1) / kRestoreBand;
  at::parallel_for(0, planes * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> along_x;  // the band's pooled rows restored along x
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / bands, y_begin = (task % bands) * kRestoreBand;
      const int64_t y_end = std::min(y_begin + kRestoreBand, H);
      const int64_t r_lo = ty[y_begin].i0, r_hi = ty[y_end - 1].i1 + 1;  // taps only grow with y
      along_x.resize((r_hi - r_lo) * W);
      const T *l0 = tx.lambda0.data(), *l1 = tx.lambda1.data();
      for (int64_t r = r_lo; r < r_hi; ++r) {
        const scalar_t* p = pooled + (plane * Hp + r) * Wp;
        T* o = along_x.data() + (r - r_lo) * W;
        for (const auto& run : tx.runs) {
          const T a = T(p[run.i0]), b = T(p[run.i1]);
#pragma omp simd
          for (int64_t x = run.begin; x < run.end; ++x) o[x] = l0[x] * a + l1[x] * b;
        }
      }
      for (int64_t y = y_begin; y < y_end; ++y) {
        const T* a = along_x.data() + (ty[y].i0 - r_lo) * W;
        const T* b = along_x.data() + (ty[y].i1 - r_lo) * W;
        const T w0 = ty[y].lambda0, w1 = ty[y].lambda1;
        scalar_t* o = out + (plane * H + y) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) o[x] = scalar_t(w0 * a[x] + w1 * b[x]);
      }
    }
  });
}

// The transpose of the restore as dense bands: source s receives sum_k weight[s][k] * out[lo[s] + k].
template <typename T>
struct TransposedTaps {
  std::vector<int64_t> lo, len;
  std::vector<std::vector<T>> weight;

  TransposedTaps(int64_t in_size, int64_t out_size) : lo(in_size, out_size), len(in_size, 0), weight(in_size) {
    const auto taps = restore_taps<T>(in_size, out_size);
    std::vector<int64_t> hi(in_size, 0);
    for (int64_t d = 0; d < out_size; ++d) {
      for (int64_t s : {taps[d].i0, taps[d].i1}) lo[s] = std::min(lo[s], d), hi[s] = std::max(hi[s], d + 1);
    }
    for (int64_t s = 0; s < in_size; ++s) len[s] = std::max<int64_t>(hi[s] - lo[s], 0), weight[s].assign(len[s], T(0));
    for (int64_t d = 0; d < out_size; ++d) {
      weight[taps[d].i0][d - lo[taps[d].i0]] += taps[d].lambda0;
      weight[taps[d].i1][d - lo[taps[d].i1]] += taps[d].lambda1;
    }
  }
};

// Backward, stage 1: grad_pooled = restore^T grad_output, scaled by 1 / pool^2 so it is the gradient of each
// sample of the cell. One task per (plane, cell row) owns its cells: it sums its band of grad_output rows with
// their weights along y (long contiguous loops), then each cell's taps along x. Deterministic and race-free.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> restore_transposed(const scalar_t* grad, int64_t planes, int64_t Hp,
                                                           int64_t Wp, int64_t H, int64_t W, int64_t pool) {
  using T = at::opmath_type<scalar_t>;
  const TransposedTaps<T> tx(Wp, W), ty(Hp, H);
  std::vector<T> cells(planes * Hp * Wp);
  const T inv_area = T(1) / T(pool * pool);
  at::parallel_for(0, planes * Hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> band(W);  // the task's rows of grad_output, weighted and summed along y
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / Hp, r = task % Hp;
      std::fill(band.begin(), band.end(), T(0));
      T* acc = band.data();
      for (int64_t k = 0; k < ty.len[r]; ++k) {
        const T w = ty.weight[r][k] * inv_area;
        const scalar_t* g = grad + (plane * H + ty.lo[r] + k) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) acc[x] += w * T(g[x]);
      }
      T* out = cells.data() + task * Wp;
      for (int64_t q = 0; q < Wp; ++q) {
        const T* w = tx.weight[q].data();
        const T* src = acc + tx.lo[q];
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < tx.len[q]; ++k) sum += w[k] * src[k];
        out[q] = sum;
      }
    }
  });
  return cells;
}

// dL/dix and dL/diy of one sample, given the gradient-weighted corner values.
template <typename T>
inline void add_moments(const std::array<T, 4>& v, const Corners<T>& c, int64_t i, int64_t j, T* m) {
  T gx, gy;
  corner_gradient(v.data(), c, &gx, &gy);
  m[0] += gx, m[1] += gx * T(j), m[2] += gx * T(i);
  m[3] += gy, m[4] += gy * T(j), m[5] += gy * T(i);
}

using Moments = std::array<double, 6>;

template <typename T>
void add_to(Moments& total, const T* m) {
  for (int k = 0; k < 6; ++k) total[k] += double(m[k]);
}

// Backward, stage 2 when only theta needs a gradient: tasks over (image, cell row), each summing the moments of
// the gradient-weighted image J = sum_c g_c I_c over its samples.
template <int kChannels, typename scalar_t>
std::vector<Moments> theta_moments(const scalar_t* images, const std::vector<at::opmath_type<scalar_t>>& cells,
                                   const std::vector<PixelMap<at::opmath_type<scalar_t>>>& maps, int64_t B,
                                   int64_t C, int64_t H, int64_t W, int64_t pool) {
  using T = at::opmath_type<scalar_t>;
  const int64_t Hp = H / pool, Wp = W / pool, HW = H * W;
  std::vector<Moments> partial(B * Hp, Moments{});
  at::parallel_for(0, B * Hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g(C * W);  // each sample's gradient: its cell's, spread over the cell's columns
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hp, r = task % Hp;
      const scalar_t* img = images + b * C * HW;
      const auto& map = maps[b];
      for (int64_t ch = 0; ch < C; ++ch) {
        const T* cell_row = cells.data() + ((b * C + ch) * Hp + r) * Wp;
        for (int64_t q = 0; q < Wp; ++q) std::fill_n(g.data() + ch * W + q * pool, pool, cell_row[q]);
      }
      for (int64_t i = r * pool; i < (r + 1) * pool; ++i) {
        T m[6] = {0, 0, 0, 0, 0, 0};
        const RowSpans spans = row_spans(map, i, H, W);
        const auto inside = [&](int64_t j_begin, int64_t j_end) {
          if constexpr (kChannels > 0) {
            add_inside_moments<kChannels>(img, HW, W, map, i, j_begin, j_end, g.data(), m);
          } else {
            for (int64_t ch = 0; ch < C; ++ch) {
              add_inside_moments<1>(img + ch * HW, HW, W, map, i, j_begin, j_end, g.data() + ch * W, m);
            }
          }
        };
        if constexpr (std::is_same_v<scalar_t, float>) {
          add_row_moments<kChannels>(img, C, H, W, map, i, spans.inside_begin, spans.inside_end, g.data(), m, inside);
        } else {
          inside(spans.inside_begin, spans.inside_end);
        }
        for_each_border_sample(map, i, spans, H, W, [&](int64_t j, const Corners<T>& c) {
          std::array<T, 4> weighted{0, 0, 0, 0};
          for (int64_t ch = 0; ch < C; ++ch) {
            const auto v = corner_array<false, T>(img + ch * HW, c, H, W);
            for (int k = 0; k < 4; ++k) weighted[k] += g[ch * W + j] * v[k];
          }
          add_moments(weighted, c, i, j, m);
        });
        add_to(partial[task], m);
      }
    }
  });
  return partial;
}

// Backward, stage 2 when images need a gradient: one task per (image, channel) owns its gradient plane and
// scatters into it sequentially; it also returns that channel's theta moments.
template <typename scalar_t>
std::vector<Moments> image_grad_and_moments(const scalar_t* images, const std::vector<at::opmath_type<scalar_t>>& cells,
                                            const std::vector<PixelMap<at::opmath_type<scalar_t>>>& maps, int64_t B,
                                            int64_t C, int64_t H, int64_t W, int64_t pool, bool need_theta,
                                            scalar_t* grad_images) {
  using T = at::opmath_type<scalar_t>;
  const int64_t Hp = H / pool, Wp = W / pool, HW = H * W;
  std::vector<Moments> partial(B * C, Moments{});
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C;
      const scalar_t* img = images + plane * HW;
      scalar_t* gi = grad_images + plane * HW;
      for (int64_t i = 0; i < H; ++i) {
        const T* g = cells.data() + (plane * Hp + i / pool) * Wp;
        T m[6] = {0, 0, 0, 0, 0, 0};
        const RowSpans spans = row_spans(maps[b], i, H, W);
        for_each_row_sample(maps[b], i, spans, 0, W, H, W, [&](auto inside, int64_t j, const Corners<T>& c) {
          const T gj = g[j / pool];
          const T w[4] = {(T(1) - c.fx) * (T(1) - c.fy), c.fx * (T(1) - c.fy), (T(1) - c.fx) * c.fy, c.fx * c.fy};
          for (int k = 0; k < 4; ++k) {
            const int64_t x = c.x0 + (k & 1), y = c.y0 + (k >> 1);
            if (decltype(inside)::value || (x >= 0 && x < W && y >= 0 && y < H)) {
              gi[y * W + x] = scalar_t(T(gi[y * W + x]) + gj * w[k]);
            }
          }
          if (need_theta) {
            auto v = corner_array<decltype(inside)::value, T>(img, c, H, W);
            for (auto& e : v) e *= gj;
            add_moments(v, c, i, j, m);
          }
        });
        add_to(partial[plane], m);
      }
    }
  });
  return partial;
}

template <typename scalar_t, typename F>
void with_channel_count(int64_t C, F&& f) {
  switch (C) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

void check_plane_size(const at::Tensor& images) {
  TORCH_CHECK(images.size(2) * images.size(3) < (int64_t(1) << 31), "affine_smooth: an image plane of ",
              images.size(2), "x", images.size(3), " pixels is larger than the 2^31 pixels the CPU kernel indexes");
}

at::Tensor affine_smooth_cpu(const at::Tensor& images_in, const at::Tensor& theta, int64_t pool) {
  check_affine_smooth_args(images_in, theta, pool, c10::DeviceType::CPU);
  check_plane_size(images_in);
  const at::Tensor images = images_in.contiguous();
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t Hp = H / pool, Wp = W / pool;
  at::Tensor out = at::empty_like(images);
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "affine_smooth_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto maps = pixel_maps<T>(theta, H, W);
    at::Tensor pooled = pool == 1 ? out : at::empty({B, C, Hp, Wp}, images.options());
    with_channel_count<scalar_t>(C, [&](auto nc) {
      pooled_warp<decltype(nc)::value>(images.const_data_ptr<scalar_t>(), maps, B, C, H, W, pool,
                                       pooled.data_ptr<scalar_t>());
    });
    if (pool > 1) restore(pooled.const_data_ptr<scalar_t>(), B * C, Hp, Wp, H, W, out.data_ptr<scalar_t>());
  });
  fill_nan(out, images_outside_domain(theta));
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_smooth_backward_cpu(const at::Tensor& grad_output,
                                                              const at::Tensor& images_in, const at::Tensor& theta,
                                                              int64_t pool, std::array<bool, 2> output_mask) {
  check_affine_smooth_args(images_in, theta, pool, c10::DeviceType::CPU);
  check_affine_smooth_grad(grad_output, images_in);
  check_plane_size(images_in);
  const at::Tensor images = images_in.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t Hp = H / pool, Wp = W / pool;
  const bool need_images = output_mask[0], need_theta = output_mask[1];
  at::Tensor grad_images = need_images ? at::zeros_like(images) : at::empty({0}, images.options());
  at::Tensor grad_theta = need_theta ? at::empty({B, 2, 3}, theta.options()) : at::empty({0}, theta.options());
  if (!need_images && !need_theta) return {grad_images, grad_theta};

  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "affine_smooth_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto maps = pixel_maps<T>(theta, H, W);
    const auto cells = restore_transposed(grad.const_data_ptr<scalar_t>(), B * C, Hp, Wp, H, W, pool);
    std::vector<Moments> partial;
    int64_t per_image = 0;
    if (need_images) {
      partial = image_grad_and_moments(images.const_data_ptr<scalar_t>(), cells, maps, B, C, H, W, pool, need_theta,
                                       grad_images.data_ptr<scalar_t>());
      per_image = C;
    } else {
      with_channel_count<scalar_t>(C, [&](auto nc) {
        partial = theta_moments<decltype(nc)::value>(images.const_data_ptr<scalar_t>(), cells, maps, B, C, H, W, pool);
      });
      per_image = Hp;
    }
    if (need_theta) {
      at::Tensor out = at::empty({B, 6}, theta.options().dtype(at::kDouble));
      double* o = out.data_ptr<double>();
      for (int64_t b = 0; b < B; ++b) {
        Moments total{};
        for (int64_t k = 0; k < per_image; ++k) {
          for (int e = 0; e < 6; ++e) total[e] += partial[b * per_image + k][e];
        }
        theta_grad_from_moments(total.data(), H, W, o + 6 * b);
      }
      grad_theta.copy_(out.view({B, 2, 3}));
    }
  });
  const auto bad = images_outside_domain(theta);
  if (need_images) fill_nan(grad_images, bad);
  if (need_theta) fill_nan(grad_theta, bad);
  return {grad_images, grad_theta};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CPU, m) {
  m.impl("affine_smooth", &affine_smooth_cpu);
  m.impl("affine_smooth_backward", &affine_smooth_backward_cpu);
}

}  // namespace dmfast
