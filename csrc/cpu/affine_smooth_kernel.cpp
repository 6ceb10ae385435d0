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
#include <type_traits>
#include <vector>

#include "../affine_smooth.h"
#include "../checks.h"

namespace dmfast {
namespace {

constexpr int64_t kRowGrain = 4;

template <typename T>
T value_or_zero(const T* plane, int64_t y, int64_t x, int64_t H, int64_t W) {
  return (y >= 0 && y < H && x >= 0 && x < W) ? plane[y * W + x] : T(0);
}

// Keeps far out-of-frame coordinates finite and integral-castable; beyond [-2, size + 1] every corner is outside
// the image, so value and gradient stay exactly zero.
template <typename T>
T clamp_far(T v, int64_t size) {
  if (!(v > T(-2))) return T(-2);
  if (!(v < T(size + 1))) return T(size + 1);
  return v;
}

// Whether every corner of every sample of cell (r, q) lies in the image. The coordinates are monotone in i and
// j, so the four extreme samples decide; the margin absorbs rounding differences with the sample loops.
template <typename T>
inline bool cell_inside(const PixelMap<T>& map, int64_t r, int64_t q, int64_t pool, int64_t H, int64_t W) {
  const int64_t i_lo = r * pool, i_hi = i_lo + pool - 1, j_lo = q * pool, j_hi = j_lo + pool - 1;
  const T xs[4] = {map.x(i_lo, j_lo), map.x(i_lo, j_hi), map.x(i_hi, j_lo), map.x(i_hi, j_hi)};
  const T ys[4] = {map.y(i_lo, j_lo), map.y(i_lo, j_hi), map.y(i_hi, j_lo), map.y(i_hi, j_hi)};
  const T margin = T(1e-3);
  return *std::min_element(xs, xs + 4) >= T(0) && *std::max_element(xs, xs + 4) <= T(W - 1) - margin &&
         *std::min_element(ys, ys + 4) >= T(0) && *std::max_element(ys, ys + 4) <= T(H - 1) - margin;
}

// Calls fn(inside, i, j, corners) for the pool x pool samples of cell (r, q), with `inside` a std::bool_constant
// (see cell_inside) so the callee can skip bounds checks. The hot kernels below have their own vectorisable
// loops for inside cells and use this for border cells and the image-gradient scatter.
template <typename T, typename Fn>
inline void for_each_sample(const PixelMap<T>& map, int64_t r, int64_t q, int64_t pool, int64_t H, int64_t W,
                            Fn&& fn) {
  const int64_t i_lo = r * pool, j_lo = q * pool;
  const bool inside = cell_inside(map, r, q, pool, H, W);
  for (int64_t i = i_lo; i < i_lo + pool; ++i) {
    const T x_base = map.x_row * T(i) + map.x0, y_base = map.y_row * T(i) + map.y0;
    if (inside) {
      for (int64_t j = j_lo; j < j_lo + pool; ++j) {
        const T ix = map.x_col * T(j) + x_base, iy = map.y_col * T(j) + y_base;
        const int64_t x0 = int64_t(ix), y0 = int64_t(iy);  // non-negative here: truncation is floor
        fn(std::true_type{}, i, j, Corners<T>{x0, y0, ix - T(x0), iy - T(y0)});
      }
    } else {
      for (int64_t j = j_lo; j < j_lo + pool; ++j) {
        const T ix = clamp_far(map.x_col * T(j) + x_base, W), iy = clamp_far(map.y_col * T(j) + y_base, H);
        fn(std::false_type{}, i, j, corners_of(ix, iy));
      }
    }
  }
}

// Inside-cell sum of the bilinear samples of channels [0, kChannels) into acc, written so the compiler turns the
// j loop into vector gathers (32-bit offsets; the caller checked H * W < 2^31). Per-column partial sums in
// `columns` (kChannels * pool scratch) keep horizontal reductions out of the row loop.
template <int kChannels, typename scalar_t, typename T>
inline void inside_cell_sum(const scalar_t* img, int64_t HW, int64_t W, const PixelMap<T>& map, int64_t r, int64_t q,
                            int64_t pool, T* columns, T* acc) {
  const int w = int(W), n = int(pool), j_lo = int(q * pool);
  std::fill(columns, columns + kChannels * n, T(0));
  for (int64_t i = r * pool; i < (r + 1) * pool; ++i) {
    const T x_base = map.x_row * T(i) + map.x0, y_base = map.y_row * T(i) + map.y0;
#pragma omp simd
    for (int k = 0; k < n; ++k) {
      const T ix = map.x_col * T(j_lo + k) + x_base, iy = map.y_col * T(j_lo + k) + y_base;
      const int x0 = int(ix), y0 = int(iy);
      const T fx = ix - T(x0), fy = iy - T(y0);
      const T w00 = (T(1) - fx) * (T(1) - fy), w01 = fx * (T(1) - fy), w10 = (T(1) - fx) * fy, w11 = fx * fy;
      const int off = y0 * w + x0;
      for (int c = 0; c < kChannels; ++c) {
        const scalar_t* p = img + c * HW;
        columns[c * n + k] += w00 * T(p[off]) + w01 * T(p[off + 1]) + w10 * T(p[off + w]) + w11 * T(p[off + w + 1]);
      }
    }
  }
  for (int c = 0; c < kChannels; ++c) {
    T s = 0;
    for (int k = 0; k < n; ++k) s += columns[c * n + k];
    acc[c] += s;
  }
}

// Inside-cell theta moments (see add_moments) of the gradient-weighted image J = sum_c g[c] I_c, accumulated per
// column in `columns` (6 * pool scratch) like inside_cell_sum.
template <int kChannels, typename scalar_t, typename T>
inline void inside_cell_moments(const scalar_t* img, int64_t HW, int64_t W, const PixelMap<T>& map, int64_t r,
                                int64_t q, int64_t pool, const T* g, T* columns, T* m) {
  const int w = int(W), n = int(pool), j_lo = int(q * pool);
  std::fill(columns, columns + 6 * n, T(0));
  for (int64_t i = r * pool; i < (r + 1) * pool; ++i) {
    const T x_base = map.x_row * T(i) + map.x0, y_base = map.y_row * T(i) + map.y0;
#pragma omp simd
    for (int k = 0; k < n; ++k) {
      const T j = T(j_lo + k);
      const T ix = map.x_col * j + x_base, iy = map.y_col * j + y_base;
      const int x0 = int(ix), y0 = int(iy);
      const T fx = ix - T(x0), fy = iy - T(y0);
      const int off = y0 * w + x0;
      T v00 = 0, v01 = 0, v10 = 0, v11 = 0;
      for (int c = 0; c < kChannels; ++c) {
        const scalar_t* p = img + c * HW;
        v00 += g[c] * T(p[off]), v01 += g[c] * T(p[off + 1]);
        v10 += g[c] * T(p[off + w]), v11 += g[c] * T(p[off + w + 1]);
      }
      const T gx = (T(1) - fy) * (v01 - v00) + fy * (v11 - v10);
      const T gy = (T(1) - fx) * (v10 - v00) + fx * (v11 - v01);
      columns[k] += gx, columns[n + k] += gx * j, columns[2 * n + k] += gx * T(i);
      columns[3 * n + k] += gy, columns[4 * n + k] += gy * j, columns[5 * n + k] += gy * T(i);
    }
  }
  for (int e = 0; e < 6; ++e) {
    T s = 0;
    for (int k = 0; k < n; ++k) s += columns[e * n + k];
    m[e] += s;
  }
}

// The four corner values of one channel plane at a sample.
template <bool kInside, typename T, typename scalar_t>
inline std::array<T, 4> corner_values(const scalar_t* plane, const Corners<T>& c, int64_t H, int64_t W) {
  if constexpr (kInside) {
    const scalar_t* p = plane + c.y0 * W + c.x0;
    return {T(p[0]), T(p[1]), T(p[W]), T(p[W + 1])};
  } else {
    return {T(value_or_zero(plane, c.y0, c.x0, H, W)), T(value_or_zero(plane, c.y0, c.x0 + 1, H, W)),
            T(value_or_zero(plane, c.y0 + 1, c.x0, H, W)), T(value_or_zero(plane, c.y0 + 1, c.x0 + 1, H, W))};
  }
}

template <typename T>
std::vector<PixelMap<T>> pixel_maps(const at::Tensor& theta, int64_t H, int64_t W) {
  const at::Tensor t = theta.to(at::kDouble).contiguous();
  const double* data = t.data_ptr<double>();
  std::vector<PixelMap<T>> maps(t.size(0));
  for (int64_t b = 0; b < t.size(0); ++b) maps[b] = make_pixel_map<T>(data + 6 * b, H, W);
  return maps;
}

template <typename T>
std::vector<RestoreTap<T>> restore_taps(int64_t in_size, int64_t out_size) {
  std::vector<RestoreTap<T>> taps(out_size);
  const T scale = T(in_size) / T(out_size);
  for (int64_t d = 0; d < out_size; ++d) taps[d] = restore_tap<T>(d, in_size, scale);
  return taps;
}

// Forward, stage 1: pooled[b, c, r, q] = mean of the cell's bilinear samples (the output itself when pool == 1).
// kChannels > 0 fixes the channel count at compile time (all channels share one sample loop); 0 loops channels.
template <int kChannels, typename scalar_t>
void pooled_warp(const scalar_t* images, const std::vector<PixelMap<at::opmath_type<scalar_t>>>& maps, int64_t B,
                 int64_t C, int64_t H, int64_t W, int64_t pool, scalar_t* pooled) {
  using T = at::opmath_type<scalar_t>;
  const int64_t Hp = H / pool, Wp = W / pool, HW = H * W;
  const T inv_area = T(1) / T(pool * pool);
  at::parallel_for(0, B * Hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(C), columns(C * pool);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hp, r = task % Hp;
      const scalar_t* img = images + b * C * HW;
      for (int64_t q = 0; q < Wp; ++q) {
        std::fill(acc.begin(), acc.end(), T(0));
        if (cell_inside(maps[b], r, q, pool, H, W)) {
          if constexpr (kChannels > 0) {
            inside_cell_sum<kChannels>(img, HW, W, maps[b], r, q, pool, columns.data(), acc.data());
          } else {
            for (int64_t ch = 0; ch < C; ++ch) {
              inside_cell_sum<1>(img + ch * HW, HW, W, maps[b], r, q, pool, columns.data(), &acc[ch]);
            }
          }
        } else {
          for_each_sample(maps[b], r, q, pool, H, W, [&](auto, int64_t, int64_t, const Corners<T>& c) {
            const T w00 = (T(1) - c.fx) * (T(1) - c.fy), w01 = c.fx * (T(1) - c.fy);
            const T w10 = (T(1) - c.fx) * c.fy, w11 = c.fx * c.fy;
            for (int64_t ch = 0; ch < C; ++ch) {
              const auto v = corner_values<false, T>(img + ch * HW, c, H, W);
              acc[ch] += w00 * v[0] + w01 * v[1] + w10 * v[2] + w11 * v[3];
            }
          });
        }
        for (int64_t ch = 0; ch < C; ++ch) pooled[((b * C + ch) * Hp + r) * Wp + q] = scalar_t(acc[ch] * inv_area);
      }
    }
  });
}

// The restore's taps as arrays (index and weight of both neighbours per output index) for vectorised loops.
template <typename T>
struct TapTable {
  std::vector<int32_t> i0, i1;
  std::vector<T> lambda0, lambda1;

  TapTable(int64_t in_size, int64_t out_size) : i0(out_size), i1(out_size), lambda0(out_size), lambda1(out_size) {
    const auto taps = restore_taps<T>(in_size, out_size);
    for (int64_t d = 0; d < out_size; ++d) {
      i0[d] = int32_t(taps[d].i0), i1[d] = int32_t(taps[d].i1);
      lambda0[d] = taps[d].lambda0, lambda1[d] = taps[d].lambda1;
    }
  }
};

// Forward, stage 2: bilinear restore of the pooled planes to H x W, one output row per step.
template <typename scalar_t>
void restore(const scalar_t* pooled, int64_t planes, int64_t Hp, int64_t Wp, int64_t H, int64_t W, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const TapTable<T> ty(Hp, H), tx(Wp, W);
  at::parallel_for(0, planes * H, kRowGrain * 4, [&](int64_t begin, int64_t end) {
    std::vector<T> blended(Wp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / H, y = row % H;
      const scalar_t* p0 = pooled + (plane * Hp + ty.i0[y]) * Wp;
      const scalar_t* p1 = pooled + (plane * Hp + ty.i1[y]) * Wp;
      for (int64_t q = 0; q < Wp; ++q) blended[q] = ty.lambda0[y] * T(p0[q]) + ty.lambda1[y] * T(p1[q]);
      scalar_t* o = out + row * W;
      const T* bl = blended.data();
      const int32_t *x0 = tx.i0.data(), *x1 = tx.i1.data();
      const T *l0 = tx.lambda0.data(), *l1 = tx.lambda1.data();
#pragma omp simd
      for (int64_t x = 0; x < W; ++x) o[x] = scalar_t(l0[x] * bl[x0[x]] + l1[x] * bl[x1[x]]);
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
// sample of the cell. Gathers only (rows, then columns): deterministic and race-free.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> restore_transposed(const scalar_t* grad, int64_t planes, int64_t Hp,
                                                           int64_t Wp, int64_t H, int64_t W, int64_t pool) {
  using T = at::opmath_type<scalar_t>;
  const TransposedTaps<T> tx(Wp, W), ty(Hp, H);
  std::vector<T> rows(planes * H * Wp), cells(planes * Hp * Wp, T(0));
  at::parallel_for(0, planes * H, kRowGrain * 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t q = 0; q < Wp; ++q) {
        const scalar_t* g = grad + row * W + tx.lo[q];
        const T* w = tx.weight[q].data();
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < tx.len[q]; ++k) s += w[k] * T(g[k]);
        rows[row * Wp + q] = s;
      }
    }
  });
  const T inv_area = T(1) / T(pool * pool);
  at::parallel_for(0, planes * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / Hp, r = task % Hp;
      T* out = cells.data() + task * Wp;
      for (int64_t k = 0; k < ty.len[r]; ++k) {
        const T w = ty.weight[r][k] * inv_area;
        const T* src = rows.data() + (plane * H + ty.lo[r] + k) * Wp;
#pragma omp simd
        for (int64_t q = 0; q < Wp; ++q) out[q] += w * src[q];
      }
    }
  });
  return cells;
}

// dL/dix and dL/diy of one sample, given the gradient-weighted corner values.
template <typename T>
inline void add_moments(const std::array<T, 4>& v, const Corners<T>& c, int64_t i, int64_t j, T* m) {
  const T gx = (T(1) - c.fy) * (v[1] - v[0]) + c.fy * (v[3] - v[2]);
  const T gy = (T(1) - c.fx) * (v[2] - v[0]) + c.fx * (v[3] - v[1]);
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
    std::vector<T> g(C), columns(6 * pool);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hp, r = task % Hp;
      const scalar_t* img = images + b * C * HW;
      for (int64_t q = 0; q < Wp; ++q) {
        for (int64_t ch = 0; ch < C; ++ch) g[ch] = cells[((b * C + ch) * Hp + r) * Wp + q];
        T m[6] = {0, 0, 0, 0, 0, 0};
        if (cell_inside(maps[b], r, q, pool, H, W)) {
          if constexpr (kChannels > 0) {
            inside_cell_moments<kChannels>(img, HW, W, maps[b], r, q, pool, g.data(), columns.data(), m);
          } else {
            for (int64_t ch = 0; ch < C; ++ch) {
              inside_cell_moments<1>(img + ch * HW, HW, W, maps[b], r, q, pool, &g[ch], columns.data(), m);
            }
          }
        } else {
          for_each_sample(maps[b], r, q, pool, H, W, [&](auto, int64_t i, int64_t j, const Corners<T>& c) {
            std::array<T, 4> weighted{0, 0, 0, 0};
            for (int64_t ch = 0; ch < C; ++ch) {
              const auto v = corner_values<false, T>(img + ch * HW, c, H, W);
              for (int k = 0; k < 4; ++k) weighted[k] += g[ch] * v[k];
            }
            add_moments(weighted, c, i, j, m);
          });
        }
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
      for (int64_t r = 0; r < Hp; ++r) {
        for (int64_t q = 0; q < Wp; ++q) {
          const T g = cells[(plane * Hp + r) * Wp + q];
          T m[6] = {0, 0, 0, 0, 0, 0};
          for_each_sample(maps[b], r, q, pool, H, W, [&](auto inside, int64_t i, int64_t j, const Corners<T>& c) {
            const T w[4] = {(T(1) - c.fx) * (T(1) - c.fy), c.fx * (T(1) - c.fy), (T(1) - c.fx) * c.fy, c.fx * c.fy};
            const int64_t dx[4] = {0, 1, 0, 1}, dy[4] = {0, 0, 1, 1};
            for (int k = 0; k < 4; ++k) {
              const int64_t x = c.x0 + dx[k], y = c.y0 + dy[k];
              if (decltype(inside)::value || (x >= 0 && x < W && y >= 0 && y < H)) {
                gi[y * W + x] = scalar_t(T(gi[y * W + x]) + g * w[k]);
              }
            }
            if (need_theta) {
              auto v = corner_values<decltype(inside)::value, T>(img, c, H, W);
              for (auto& e : v) e *= g;
              add_moments(v, c, i, j, m);
            }
          });
          add_to(partial[plane], m);
        }
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
  return {grad_images, grad_theta};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CPU, m) {
  m.impl("affine_smooth", &affine_smooth_cpu);
  m.impl("affine_smooth_backward", &affine_smooth_backward_cpu);
}

}  // namespace dmfast
