// CPU kernel of dmfast::cam_boxes. One task per map: the normalised map is upsampled one output row at a time
// (never the whole image), each row is thresholded into runs of foreground pixels through 64-pixel bit masks,
// and runs touching runs of the row above (8-connectivity) are merged with union-find. Each component keeps its
// box, the sum and max of its activations and its first pixel; the best max_boxes are written out.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../cam_boxes.h"
#include "../checks.h"

namespace dmfast {
namespace {

struct Run {
  int64_t x0, x1;  // [x0, x1) in its row
  int64_t parent;
  double sum, max;
};

// Union-find over runs; the root is always the smallest index, i.e. the component's first run in raster order.
int64_t find_root(std::vector<Run>& runs, int64_t i) {
  while (runs[i].parent != i) {
    runs[i].parent = runs[runs[i].parent].parent;  // path halving
    i = runs[i].parent;
  }
  return i;
}

void unite(std::vector<Run>& runs, int64_t a, int64_t b) {
  a = find_root(runs, a), b = find_root(runs, b);
  if (a != b) runs[std::max(a, b)].parent = std::min(a, b);
}

// Everything one task needs between maps, allocated once per thread.
struct Scratch {
  std::vector<double> map, along_x, row;
  std::vector<uint64_t> bits;
  std::vector<UpsampleTap> taps_x, taps_y;
};

// bits of row[0, n) >= threshold, n <= 64 (bit k for pixel k).
inline uint64_t threshold_bits(const double* row, int64_t n, double threshold) {
  uint64_t b = 0;
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512d t = _mm512_set1_pd(threshold);
  for (; k + 8 <= n; k += 8) b |= uint64_t(_mm512_cmp_pd_mask(_mm512_loadu_pd(row + k), t, _CMP_GE_OQ)) << k;
#elif defined(__AVX2__)
  const __m256d t = _mm256_set1_pd(threshold);
  for (; k + 4 <= n; k += 4) {
    b |= uint64_t(_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(row + k), t, _CMP_GE_OQ))) << k;
  }
#endif
  for (; k < n; ++k) b |= uint64_t(row[k] >= threshold) << k;
  return b;
}

// Foreground runs of one row (values >= threshold), appended to runs with their statistics.
void row_runs(const double* row, int64_t W, double threshold, std::vector<uint64_t>& bits, std::vector<Run>& runs) {
  const int64_t words = (W + 63) / 64;
  for (int64_t word = 0; word < words; ++word) {
    bits[word] = threshold_bits(row + word * 64, std::min<int64_t>(64, W - word * 64), threshold);
  }
  int64_t x = 0;
  while (x < W) {
    // Skip background to the next set bit, then to the next clear bit.
    int64_t word = x / 64;
    uint64_t b = bits[word] & (~uint64_t(0) << (x % 64));
    while (b == 0 && ++word < words) b = bits[word];
    if (b == 0) break;
    const int64_t start = word * 64 + __builtin_ctzll(b);
    word = start / 64;
    uint64_t c = ~bits[word] & (~uint64_t(0) << (start % 64));
    while (c == 0 && ++word < words) c = ~bits[word];
    const int64_t end = std::min<int64_t>(c == 0 ? W : word * 64 + __builtin_ctzll(c), W);
    double sum = 0, peak = row[start];
#pragma omp simd reduction(+ : sum) reduction(max : peak)
    for (int64_t k = start; k < end; ++k) sum += row[k], peak = peak > row[k] ? peak : row[k];
    runs.push_back(Run{start, end, int64_t(runs.size()), sum, peak});
    x = end;
  }
}

// All components of one normalised map at every threshold level.
void map_components(const double* map, int64_t h, int64_t w, int64_t H, int64_t W, const std::vector<double>& levels,
                    Scratch& s, std::vector<Component>& out) {
  s.row.resize(W), s.bits.resize((W + 63) / 64), s.along_x.resize(h * W);
  // ATen's order: every map row interpolated along x once, then each output row a blend of two of those.
  for (int64_t r = 0; r < h; ++r) {
    for (int64_t x = 0; x < W; ++x) {
      const UpsampleTap& tx = s.taps_x[x];
      s.along_x[r * W + x] = tx.lambda0 * map[r * w + tx.i0] + tx.lambda1 * map[r * w + tx.i1];
    }
  }
  std::vector<std::vector<Run>> runs(levels.size());
  std::vector<std::vector<int64_t>> row_start(levels.size(), std::vector<int64_t>(H + 1, 0));
  for (int64_t y = 0; y < H; ++y) {
    const UpsampleTap& ty = s.taps_y[y];
    const double *top = s.along_x.data() + ty.i0 * W, *bottom = s.along_x.data() + ty.i1 * W;
    const double l0 = ty.lambda0, l1 = ty.lambda1;
    double* row = s.row.data();
#pragma omp simd
    for (int64_t x = 0; x < W; ++x) row[x] = l0 * top[x] + l1 * bottom[x];
    for (size_t level = 0; level < levels.size(); ++level) {
      auto& rs = runs[level];
      const int64_t first_new = int64_t(rs.size());
      row_runs(s.row.data(), W, levels[level], s.bits, rs);
      row_start[level][y + 1] = int64_t(rs.size());
      if (y == 0) continue;
      // Merge with the previous row's runs that touch (8-connectivity: a0 <= b1 and b0 <= a1); both lists are
      // sorted, so one sweep suffices.
      int64_t prev = row_start[level][y - 1];
      const int64_t prev_end = row_start[level][y];
      for (int64_t cur = first_new; cur < int64_t(rs.size()); ++cur) {
        while (prev < prev_end && rs[prev].x1 < rs[cur].x0) ++prev;
        for (int64_t p = prev; p < prev_end && rs[p].x0 <= rs[cur].x1; ++p) unite(rs, cur, p);
      }
    }
  }
  for (size_t level = 0; level < levels.size(); ++level) {
    auto& rs = runs[level];
    std::vector<int64_t> slot(rs.size(), -1);
    int64_t y = 0;
    for (int64_t i = 0; i < int64_t(rs.size()); ++i) {
      while (row_start[level][y + 1] <= i) ++y;
      const int64_t root = find_root(rs, i);
      if (root == i) {
        slot[i] = int64_t(out.size());
        out.push_back(Component{rs[i].x0, y, rs[i].x1, y + 1, 0.0, rs[i].max, 0, int64_t(level), y * W + rs[i].x0});
      }
      Component& c = out[slot[root]];
      c.x0 = std::min(c.x0, rs[i].x0), c.x1 = std::max(c.x1, rs[i].x1), c.y1 = y + 1;
      c.sum += rs[i].sum, c.max = std::max(c.max, rs[i].max), c.count += rs[i].x1 - rs[i].x0;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_boxes_cpu(const at::Tensor& cams_in, at::IntArrayRef size,
                                                             at::ArrayRef<double> thresholds, int64_t max_boxes,
                                                             c10::string_view score) {
  check_cam_boxes_args(cams_in, size, thresholds, max_boxes, score);
  const at::Tensor cams = cams_in.reshape({-1, cams_in.size(-2), cams_in.size(-1)});
  const int64_t N = cams.size(0), h = cams.size(1), w = cams.size(2), H = size[0], W = size[1];
  const bool mean = score == "mean";
  const std::vector<double> levels(thresholds.begin(), thresholds.end());
  at::Tensor boxes = at::zeros({N, max_boxes, 4}, cams.options().dtype(at::kLong));
  at::Tensor scores = at::zeros({N, max_boxes}, cams.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({N}, cams.options().dtype(at::kLong));
  const at::Tensor maps = cams.to(at::kDouble).contiguous();  // read as [N, h, w] rows: any strides in
  const double* data = maps.const_data_ptr<double>();
  int64_t* box_out = boxes.data_ptr<int64_t>();
  double* score_out = scores.data_ptr<double>();
  int64_t* count_out = counts.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    s.map.resize(h * w), s.taps_x.resize(W), s.taps_y.resize(H);
    for (int64_t x = 0; x < W; ++x) s.taps_x[x] = upsample_tap<double>(x, w, W);
    for (int64_t y = 0; y < H; ++y) s.taps_y[y] = upsample_tap<double>(y, h, H);
    std::vector<Component> components;
    std::vector<int64_t> order;
    for (int64_t n = begin; n < end; ++n) {
      const double* m = data + n * h * w;
      if (!std::all_of(m, m + h * w, [](double v) { return std::isfinite(v); })) {
        count_out[n] = -1;  // NaN or inf: no boxes, and the caller can tell
        continue;
      }
      const auto [lo, hi] = std::minmax_element(m, m + h * w);
      if (!(*hi > *lo)) continue;  // a constant map has no region to box
      const double low = *lo, range = *hi - *lo;
      for (int64_t k = 0; k < h * w; ++k) s.map[k] = (m[k] - low) / range;
      components.clear();
      map_components(s.map.data(), h, w, H, W, levels, s, components);
      order.resize(components.size());
      std::iota(order.begin(), order.end(), 0);
      const auto ranked = [&](int64_t a, int64_t b) {
        return ranks_before(component_score(components[a], mean), components[a], component_score(components[b], mean),
                            components[b]);
      };
      const int64_t kept = std::min<int64_t>(max_boxes, int64_t(components.size()));
      std::partial_sort(order.begin(), order.begin() + kept, order.end(), ranked);
      count_out[n] = int64_t(components.size());
      for (int64_t k = 0; k < kept; ++k) {
        const Component& c = components[order[k]];
        int64_t* b = box_out + (n * max_boxes + k) * 4;
        b[0] = c.x0, b[1] = c.y0, b[2] = c.x1, b[3] = c.y1;
        score_out[n * max_boxes + k] = component_score(c, mean);
      }
    }
  });
  const auto lead = cams_in.sizes().slice(0, cams_in.dim() - 2);
  std::vector<int64_t> box_shape(lead.begin(), lead.end()), score_shape(lead.begin(), lead.end());
  box_shape.insert(box_shape.end(), {max_boxes, 4});
  score_shape.push_back(max_boxes);
  return {boxes.view(box_shape), scores.view(score_shape), counts.view(lead)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CPU, m) { m.impl("cam_boxes", &cam_boxes_cpu); }

}  // namespace dmfast
