// Bilinear samples of the affine warp along one output row, a vector of lanes at a time, without vector gathers
// (slow on many x86 parts). Along a row the source point moves by (x_col, y_col) per sample, so for a warp near the
// identity the kLanes samples of a vector read two to four consecutive source rows and, in each, a few contiguous
// loads or one window of 2 * kLanes + 1 pixels permuted into place (RowVector below). Vectors that do not fit, and the
// samples near the image's border, take the caller's general loop.
//
// float32 only, compiled where the CPU variant has AVX2 and FMA or AVX-512; plain C++ and intrinsics, no ATen, so
// the per-variant builds stay cheap.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "../affine_smooth.h"

// The per-vector helpers and lambdas below must inline into the vector loops: a call passes the vectors through
// memory (and the compiler declines to inline the larger ones by itself).
#if defined(__GNUC__)
#define DMFAST_VECTOR_INLINE inline __attribute__((always_inline))
#define DMFAST_LAMBDA_INLINE __attribute__((always_inline))
#else
#define DMFAST_VECTOR_INLINE inline
#define DMFAST_LAMBDA_INLINE
#endif

namespace dmfast {

#if defined(__AVX512F__)
struct RowLanes {
  using V = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;

  static V set1(float v) { return _mm512_set1_ps(v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V at_least(V a, float b) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, set1(b), _CMP_GE_OQ), set1(1.0f));
  }
  static V abs(V a) { return _mm512_abs_ps(a); }
  static V lane_index() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I truncate(V v) { return _mm512_cvttps_epi32(v); }
  static V to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static I lane_int() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I minus(I v, int s) { return _mm512_sub_epi32(v, _mm512_set1_epi32(s)); }
  static int first(I v) { return _mm512_cvtsi512_si32(v); }
  static int last(I v) { return _mm_extract_epi32(_mm512_extracti32x4_epi32(v, 3), 3); }
  // Every lane in [0, limit] (unsigned: a negative lane is above any limit).
  static bool all_within(I v, int limit) {
    return _mm512_cmp_epu32_mask(v, _mm512_set1_epi32(limit), _MM_CMPINT_LE) == 0xFFFF;
  }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static bool any_nan(V v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  // Window p[0, 2 * kLanes) read at idx in every lane.
  using Pick = I;
  static Pick make_pick(I idx) { return idx; }
  static V pick(const float* p, Pick idx) { return _mm512_permutex2var_ps(load(p), idx, load(p + kLanes)); }
};

#elif defined(__AVX2__) && defined(__FMA__)
struct RowLanes {
  using V = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;

  static V set1(float v) { return _mm256_set1_ps(v); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V at_least(V a, float b) { return _mm256_and_ps(_mm256_cmp_ps(a, set1(b), _CMP_GE_OQ), set1(1.0f)); }
  static V abs(V a) { return _mm256_andnot_ps(set1(-0.0f), a); }
  static V lane_index() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  static I truncate(V v) { return _mm256_cvttps_epi32(v); }
  static V to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static I lane_int() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I minus(I v, int s) { return _mm256_sub_epi32(v, _mm256_set1_epi32(s)); }
  static int first(I v) { return _mm256_cvtsi256_si32(v); }
  static int last(I v) { return _mm_extract_epi32(_mm256_extracti128_si256(v, 1), 3); }
  // Every lane in [0, limit] (unsigned: a negative lane is above any limit).
  static bool all_within(I v, int limit) {
    const I top = _mm256_set1_epi32(limit);
    return _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(v, top), top)) == -1;
  }
  static bool any_nan(V v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  static float sum(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  // Window p[0, 16) read at idx in every lane: each half permuted, then bit 3 of idx chooses (blendv reads bit 31).
  struct Pick {
    I idx;
    V upper;
  };
  static Pick make_pick(I idx) { return {idx, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))}; }
  static V pick(const float* p, const Pick& k) {
    const V lo = _mm256_permutevar8x32_ps(load(p), k.idx), hi = _mm256_permutevar8x32_ps(load(p + kLanes), k.idx);
    return _mm256_blendv_ps(lo, hi, k.upper);
  }
};

#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

// kLanes consecutive samples j0 .. j0 + kLanes - 1 of one output row: where they read and their weights.
// Two ways to bring each lane its corners without a gather:
//  - shift: when the map keeps the scale along x near 1, lane k's left corner column is first + k or first + k + 1,
//    so three contiguous loads (at first, first + 1, first + 2) hold every lane's corners;
//  - window: otherwise, while the samples span at most 2 * kLanes columns, two loads of a window and a permute per
//    corner.
// Along y the lanes' top corners lie in one to three consecutive rows (a turn of up to about 2 / kLanes radians),
// so two to four rows are read. Each lane weighs the points at offsets k = 0, 1, ... from it, at position t, by the
// hat functions max(1 - |t - k|, 0): the bilinear weights of the pair around t, zero for the others.
// The kind (rows read, shift or window) depends on the map only, so it is chosen once per output row (row_kind)
// and the vector loop carries no per-vector dispatch.
struct RowVector {
  using L = RowLanes;
  L::V j;
  L::V u;   // shift: x relative to first + k, in [0, 2)
  L::V fx;  // window: x fraction
  L::V v;   // y relative to the first row read, in [0, rows - 1)
  L::Pick picks;      // window: each lane's left corner column in the window
  int64_t offset;     // of `first` (shift) or of the window (window) in the first row read, within a plane
  int64_t ahead;      // offset of the row to prefetch
  bool one_row;       // the lanes' top corners lie in one row
  static constexpr int kPrefetchRows = 3;

  // false when the samples do not fit the kind (the caller samples them its general way). The caller guarantees
  // that every corner of these samples lies inside the image (the row's inside span) and that W >= 2 * kLanes + 1.
  template <int kRows, bool kShift>
  DMFAST_VECTOR_INLINE bool place(const PixelMap<float>& map, float x_base, float y_base, int64_t j0, int64_t H,
                                  int64_t W) {
    constexpr int n = L::kLanes;
    j = L::add(L::set1(float(j0)), L::lane_index());
    const L::V ix = L::fma(L::set1(map.x_col), j, L::set1(x_base));
    const L::V iy = L::fma(L::set1(map.y_col), j, L::set1(y_base));
    const L::I x0 = L::truncate(ix), y0 = L::truncate(iy);  // positive: truncation is floor
    // A correctly rounded fma of an affine function of j is monotone in j, and so is its floor: the first and last
    // lanes bound every lane's corners.
    const int x_first = L::first(x0), x_last = L::last(x0);
    const int y_first = L::first(y0), y_last = L::last(y0);
    const auto [y_lo, y_hi] = std::minmax(y_first, y_last);
    const int y_span = y_hi - y_lo;
    if (y_span > kRows - 2 || y_lo < 0 || y_lo + kRows > H) return false;  // the rows read stay in the image
    if constexpr (kShift) {
      // Lane k's corner column minus k is not monotone (rounding may dip it by one): checked per lane.
      const int first = map.x_col >= 1.0f ? x_first : x_last - (n - 1);
      if (first < 0 || first + n + 1 >= W || !L::all_within(L::minus(L::sub(x0, L::lane_int()), first), 1)) {
        return false;
      }
      u = L::sub(ix, L::add(L::set1(float(first)), L::lane_index()));  // exact: both are multiples of ix's ulp
      offset = int64_t(y_lo) * W + first;
    } else {
      const auto [x_lo, x_hi] = std::minmax(x_first, x_last);
      const int left = x_lo < W - 2 * n - 1 ? x_lo : int(W) - 2 * n - 1;  // both windows end inside the row
      if (left < 0 || x_hi - left > 2 * n - 1) return false;
      picks = L::make_pick(L::minus(x0, left));
      fx = L::sub(ix, L::to_float(x0));
      offset = int64_t(y_lo) * W + left;
    }
    v = L::sub(iy, L::set1(float(y_lo)));
    one_row = y_span == 0;
    ahead = y_lo + kPrefetchRows < H ? kPrefetchRows * W : 0;
    return true;
  }

  // Asks for the pixels that the row kPrefetchRows - 1 output rows further down will read (for a map near the
  // identity): along a tilted row the hardware prefetchers see no stream.
  DMFAST_VECTOR_INLINE void prefetch(const float* plane) const {
    _mm_prefetch(reinterpret_cast<const char*>(plane + offset + ahead), _MM_HINT_T0);
  }

  // The points a vector of kind (kRows, kShift) reads, per row: kCols of them per lane.
  template <int kRows, bool kShift>
  struct Points {
    static constexpr int kCols = kShift ? 3 : 2;
    L::V at[kRows][kCols];
  };

  template <int kRows, bool kShift>
  DMFAST_VECTOR_INLINE Points<kRows, kShift> points(const float* plane, int64_t W) const {
    Points<kRows, kShift> p;
    for (int r = 0; r < kRows; ++r) {
      const float* row = plane + offset + r * W;
      if constexpr (kShift) {
        p.at[r][0] = L::load(row), p.at[r][1] = L::load(row + 1), p.at[r][2] = L::load(row + 2);
      } else {
        p.at[r][0] = L::pick(row, picks), p.at[r][1] = L::pick(row + 1, picks);
      }
    }
    return p;
  }

  // Weights of the kCount points along one axis (see the hat functions above) and their derivatives to the
  // coordinate t in [0, kCount - 1): the pair around t gets 1 - f and f, f = t - floor(t), and the derivatives
  // -1 and 1, with floor's pair at an integer t.
  template <int kCount>
  DMFAST_VECTOR_INLINE static void hats(L::V t, L::V* w, L::V* dw) {
    const L::V one = L::set1(1.0f);
    if constexpr (kCount == 2) {
      w[0] = L::sub(one, t), w[1] = t;
      dw[0] = L::set1(-1.0f), dw[1] = one;
    } else {
      L::V floor_is[kCount];  // floor_is[k]: floor(t) == k as 0 or 1 (never for the last point)
      L::V reached = one;     // t >= k
      for (int k = 0; k < kCount - 1; ++k) {
        const L::V next = k + 2 < kCount ? L::at_least(t, float(k + 1)) : L::zero();
        floor_is[k] = L::sub(reached, next);
        reached = next;
      }
      floor_is[kCount - 1] = L::zero();
      // The end points' hats are one-sided; with three points the middle one completes the sum to 1.
      w[0] = L::max(L::sub(one, t), L::zero());
      w[kCount - 1] = L::max(L::sub(t, L::set1(float(kCount - 2))), L::zero());
      if constexpr (kCount == 3) {
        w[1] = L::sub(L::sub(one, w[0]), w[2]);
      } else {
        for (int k = 1; k < kCount - 1; ++k) {
          w[k] = L::max(L::sub(one, L::abs(L::sub(t, L::set1(float(k))))), L::zero());
        }
      }
      for (int k = 0; k < kCount; ++k) dw[k] = L::sub(k > 0 ? floor_is[k - 1] : L::zero(), floor_is[k]);
    }
  }

  // The hat weights of the points along x and along y, and their derivatives: a point's bilinear weight is the
  // product of its column's and its row's.
  template <int kRows, bool kShift>
  struct Hats {
    static constexpr int kCols = Points<kRows, kShift>::kCols;
    L::V x[kCols], dx[kCols], y[kRows], dy[kRows];
  };

  template <int kRows, bool kShift>
  DMFAST_VECTOR_INLINE Hats<kRows, kShift> hat_weights() const {
    Hats<kRows, kShift> h;
    hats<Hats<kRows, kShift>::kCols>(kShift ? u : fx, h.x, h.dx);
    hats<kRows>(v, h.y, h.dy);
    return h;
  }

  // sum_r wy[r] * sum_k wx[k] * p[r][k]: each row along x, then the rows in two chains (short dependency chains:
  // the FMA latency, not the throughput, bounds one long chain).
  template <int kRows, int kCols>
  DMFAST_VECTOR_INLINE static L::V separable(const L::V (&wx)[kCols], const L::V (&wy)[kRows],
                                             const L::V (&p)[kRows][kCols]) {
    L::V row[kRows];
    for (int r = 0; r < kRows; ++r) {
      row[r] = L::mul(wx[0], p[r][0]);
      for (int k = 1; k < kCols; ++k) row[r] = L::fma(wx[k], p[r][k], row[r]);
    }
    L::V even = L::mul(wy[0], row[0]), odd = L::mul(wy[1], row[1]);
    for (int r = 2; r < kRows; ++r) {
      L::V& chain = r % 2 == 0 ? even : odd;
      chain = L::fma(wy[r], row[r], chain);
    }
    return L::add(even, odd);
  }
};

// The rows a vector reads (2 to 4; 0: none fits, the general loop takes the row) and whether it takes the shift
// way, from the map: along a vector of kLanes samples y moves by |y_col| (kLanes - 1), x by x_col (kLanes - 1).
// The margins cover the rounding of coordinates below about 2^14; place() checks every vector anyway.
struct RowKind {
  int rows;
  bool shift;
};

inline RowKind row_kind(const PixelMap<float>& map) {
  constexpr float reach = float(RowLanes::kLanes - 1), margin = 1e-3f;
  const float y_move = std::abs(map.y_col) * reach;
  const int rows = map.y_col == 0.0f ? 2 : y_move < 1 - margin ? 3 : y_move < 2 - margin ? 4 : 0;
  const bool shift = map.x_col > 0.0f && std::abs(map.x_col - 1.0f) * reach < 1 - margin;
  // The window holds 2 kLanes columns: a wider step leaves every vector to the general loop.
  const bool window_fits = std::abs(map.x_col) * reach < float(2 * RowLanes::kLanes) + margin;
  return {shift || window_fits ? rows : 0, shift};
}

// The samples [begin, end) of output row i, all inside the image: fast(v, j, rows, shift) for each vector that
// fits (rows and shift as constants), general(j_begin, j_end) for the others and the remainder. With kFewerRows a
// vector of a three-row kind whose lanes lie in one row reads two (a branch per vector; measured to pay off in
// the forward, with C channels per vector, but not in the theta backward).
template <bool kFewerRows, typename Fast, typename General>
inline void for_each_row_vector(const PixelMap<float>& map, int64_t i, int64_t begin, int64_t end, int64_t H,
                                int64_t W, Fast&& fast, General&& general) {
  constexpr int n = RowLanes::kLanes;
  const RowKind kind = row_kind(map);
  if (W <= 2 * n || kind.rows == 0) {
    if (begin < end) general(begin, end);
    return;
  }
  const float x_base = map.x_row * float(i) + map.x0, y_base = map.y_row * float(i) + map.y0;
  const auto vectors = [&](auto rows, auto shift) DMFAST_LAMBDA_INLINE {
    RowVector v;
    int64_t j = begin;
    for (; j + n <= end; j += n) {
      if (v.place<rows, shift>(map, x_base, y_base, j, H, W)) {
        if constexpr (kFewerRows && rows == 3) {
          v.one_row ? fast(v, j, std::integral_constant<int, 2>{}, shift) : fast(v, j, rows, shift);
        } else {
          fast(v, j, rows, shift);
        }
      } else {
        general(j, j + n);
      }
    }
    if (j < end) general(j, end);
  };
  const auto along_x = [&](auto rows) {
    kind.shift ? vectors(rows, std::true_type{}) : vectors(rows, std::false_type{});
  };
  switch (kind.rows) {
    case 2: along_x(std::integral_constant<int, 2>{}); break;
    case 3: along_x(std::integral_constant<int, 3>{}); break;
    default: along_x(std::integral_constant<int, 4>{}); break;
  }
}

// Adds the bilinear samples [begin, end) of output row i of the C planes at img to columns[c * W + j];
// general(j_begin, j_end) and general_channel(c, j_begin, j_end) add the ones the vectors do not.
//
// A lane also reads points its sample weighs by zero; a non-finite one makes it NaN where the general loop (and the
// eager chain), which read only the lane's four corners, may not. Each channel of the vector whose value is NaN
// goes to general_channel instead.
template <int kChannels, typename General, typename GeneralChannel>
inline void add_row_samples(const float* img, int64_t C, int64_t H, int64_t W, const PixelMap<float>& map, int64_t i,
                            int64_t begin, int64_t end, float* columns, General&& general,
                            GeneralChannel&& general_channel) {
  using L = RowLanes;
  const auto lanes = [&](const RowVector& v, int64_t j, auto rows, auto shift) DMFAST_LAMBDA_INLINE {
    const auto w = v.hat_weights<rows, shift>();
    const auto sample = [&](int64_t c) DMFAST_LAMBDA_INLINE {
      const float* plane = img + c * H * W;
      v.prefetch(plane);
      return RowVector::separable(w.x, w.y, v.points<rows, shift>(plane, W).at);
    };
    const auto store = [&](int64_t c, L::V value) DMFAST_LAMBDA_INLINE {
      float* col = columns + c * W + j;
      L::store(col, L::add(L::load(col), value));
    };
    const auto add = [&](int64_t c, L::V value) DMFAST_LAMBDA_INLINE {
      L::any_nan(value) ? general_channel(c, j, j + L::kLanes) : store(c, value);
    };
    if constexpr (kChannels > 0) {
      // One NaN test for all channels (their sum); a NaN sends each channel to its own test.
      L::V values[kChannels], total = L::zero();
      for (int c = 0; c < kChannels; ++c) values[c] = sample(c), total = L::add(total, values[c]);
      if (L::any_nan(total)) {
        for (int c = 0; c < kChannels; ++c) add(c, values[c]);
      } else {
        for (int c = 0; c < kChannels; ++c) store(c, values[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) add(c, sample(c));
    }
  };
  for_each_row_vector<true>(map, i, begin, end, H, W, lanes, general);
}

// Adds the theta moments of the samples [begin, end) of output row i (see theta_grad_from_moments) to m, with
// g[c * W + j] the gradient of sample j of channel c. As in add_row_samples a NaN may come from a point weighed by
// zero; here one test per row finds it, and the row is then done the general way.
template <int kChannels, typename General>
inline void add_row_moments(const float* img, int64_t C, int64_t H, int64_t W, const PixelMap<float>& map, int64_t i,
                            int64_t begin, int64_t end, const float* g, float* m, General&& general) {
  using L = RowLanes;
  L::V sx = L::zero(), sxj = L::zero(), sy = L::zero(), syj = L::zero();
  const auto lanes = [&](const RowVector& v, int64_t j, auto rows, auto shift) DMFAST_LAMBDA_INLINE {
    // The points of the gradient-weighted image sum_c g_c I_c, then its derivatives to x and y.
    decltype(v.points<rows, shift>(img, W)) sum;
    const auto weigh = [&](int64_t c, auto first) DMFAST_LAMBDA_INLINE {
      const float* plane = img + c * H * W;
      v.prefetch(plane);
      const auto p = v.points<rows, shift>(plane, W);
      const L::V grad = L::load(g + c * W + j);
      for (int r = 0; r < rows; ++r) {
        for (int k = 0; k < decltype(p)::kCols; ++k) {
          if constexpr (decltype(first)::value) {
            sum.at[r][k] = L::mul(grad, p.at[r][k]);
          } else {
            sum.at[r][k] = L::fma(grad, p.at[r][k], sum.at[r][k]);
          }
        }
      }
    };
    weigh(0, std::true_type{});
    for (int64_t c = 1; c < (kChannels > 0 ? kChannels : C); ++c) weigh(c, std::false_type{});
    const auto w = v.hat_weights<rows, shift>();
    const L::V gx = RowVector::separable(w.dx, w.y, sum.at);  // dL/dix of the lanes' samples, all channels
    const L::V gy = RowVector::separable(w.x, w.dy, sum.at);
    sx = L::add(sx, gx), sxj = L::fma(gx, v.j, sxj);
    sy = L::add(sy, gy), syj = L::fma(gy, v.j, syj);
  };
  float m_before[6];
  std::copy(m, m + 6, m_before);
  for_each_row_vector<false>(map, i, begin, end, H, W, lanes, general);
  // NaN in a lane's gx or gy leaves NaN in sx or sy (and in sxj, syj). m goes back to its value on entry, since
  // general may have added the vectors that did not fit, and the whole row is redone.
  if (L::any_nan(L::add(sx, sy))) {
    std::copy(m_before, m_before + 6, m);
    general(begin, end);
    return;
  }
  const float row_sx = L::sum(sx), row_sy = L::sum(sy);
  m[0] += row_sx, m[1] += L::sum(sxj), m[2] += row_sx * float(i);
  m[3] += row_sy, m[4] += L::sum(syj), m[5] += row_sy * float(i);
}

#else

// Without AVX2 the general (gathering or scalar) loops do every sample.
template <int kChannels, typename General, typename GeneralChannel>
inline void add_row_samples(const float*, int64_t, int64_t, int64_t, const PixelMap<float>&, int64_t, int64_t begin,
                            int64_t end, float*, General&& general, GeneralChannel&&) {
  general(begin, end);
}

template <int kChannels, typename General>
inline void add_row_moments(const float*, int64_t, int64_t, int64_t, const PixelMap<float>&, int64_t, int64_t begin,
                            int64_t end, const float*, float*, General&& general) {
  general(begin, end);
}

#endif

}  // namespace dmfast
