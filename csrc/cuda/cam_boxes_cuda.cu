// CUDA kernel of dmfast::cam_boxes: one launch over all maps. A block takes one map at a time (grid-stride) and
// works in its own slice of a global scratch buffer: normalise the map, then per threshold level label the
// thresholded upsampled image with lock-free union-find (atomicMin on parent links, so every root is its
// component's raster-first pixel, the order scipy numbers components in), gather each component's box and
// activation statistics at its root with atomics, and merge the level's best components into the map's ranked
// output. No host synchronisation: a map with NaN or inf is reported by its count, -1.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../cam_boxes.h"
#include "../checks.h"
#include "launch.cuh"

namespace dmfast {
namespace {

constexpr int kBlock = 512;
constexpr int64_t kMaxSlots = 64;                 // maps processed at once (each with its own scratch)
constexpr int64_t kScratchBudget = int64_t(1) << 30;  // bytes of scratch at most

// Per-slot scratch: separate arrays of length H * W (pixels) or h * w (the normalised map), at the same offsets in
// every slot of the arena, so the kernel derives them from its block index (no table to upload).
struct Scratch {
  double* map;
  int32_t* parent;
  int32_t *x0, *y0, *x1, *y1, *count;
  unsigned long long* max_bits;  // non-negative doubles order like their bit patterns
  double* sum;
  int32_t* roots;  // the level's component roots, compacted
  double* rank_score;

  static int64_t bytes_per_pixel() { return 4 * 7 + 8 * 3; }

  // Eight-byte arrays first keep every array aligned.
  __host__ __device__ static Scratch at(uint8_t* slot, int64_t pixels, int64_t map_size) {
    Scratch s;
    uint8_t* p = slot;
    s.map = reinterpret_cast<double*>(p), p += map_size * 8;
    s.max_bits = reinterpret_cast<unsigned long long*>(p), p += pixels * 8;
    s.sum = reinterpret_cast<double*>(p), p += pixels * 8;
    s.rank_score = reinterpret_cast<double*>(p), p += pixels * 8;
    int32_t** ints[] = {&s.parent, &s.x0, &s.y0, &s.x1, &s.y1, &s.count, &s.roots};
    for (int32_t** field : ints) *field = reinterpret_cast<int32_t*>(p), p += pixels * 4;
    return s;
  }
};

constexpr int kMaxLevels = 8;

struct Levels {  // passed by value: no upload
  double value[kMaxLevels];
  int64_t count;
};

__device__ __forceinline__ int32_t find_root(const int32_t* parent, int32_t p) {
  while (true) {
    const int32_t q = static_cast<const volatile int32_t*>(parent)[p];
    if (q == p) return p;
    p = q;
  }
}

__device__ __forceinline__ void unite(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = find_root(parent, a), b = find_root(parent, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b, b = t;
    }
    const int32_t old = atomicMin(parent + b, a);
    if (old == b) return;
    b = old;
  }
}

__device__ __forceinline__ double pixel_value(const double* map, int64_t h, int64_t w, int64_t H, int64_t W,
                                              int64_t y, int64_t x) {
  return bilinear(map, w, upsample_tap<double>(y, h, H), upsample_tap<double>(x, w, W));
}

struct Candidate {
  double score;
  int64_t level, first;
  int64_t box[4];
};

// The phases of cam_boxes_kernel. Each is called by every thread of the block together, so every __syncthreads()
// in them is reached by the whole block; the ones that end with a barrier say so, and then the next phase may read
// what they wrote.

struct MapRange {
  double lo, hi;
  bool finite;  // every value finite (fmin and fmax skip NaN, so the range alone would not tell)
};

// The map's min, max and finiteness: a strided pass per thread, then a tree over the block in shared memory. Ends
// with a barrier, after which the reduction arrays are free again.
template <typename scalar_t>
__device__ __forceinline__ MapRange block_min_max(const scalar_t* m, int64_t size, double* reduce_lo,
                                                  double* reduce_hi, int32_t* reduce_finite) {
  const int64_t tid = threadIdx.x;
  double lo = INFINITY, hi = -INFINITY;
  int32_t finite = 1;
  for (int64_t k = tid; k < size; k += kBlock) {
    const double v = double(m[k]);
    finite &= int32_t(isfinite(v)), lo = fmin(lo, v), hi = fmax(hi, v);
  }
  reduce_lo[tid] = lo, reduce_hi[tid] = hi, reduce_finite[tid] = finite;
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      reduce_lo[tid] = fmin(reduce_lo[tid], reduce_lo[tid + stride]);
      reduce_hi[tid] = fmax(reduce_hi[tid], reduce_hi[tid + stride]);
      reduce_finite[tid] = min(reduce_finite[tid], reduce_finite[tid + stride]);
    }
    __syncthreads();
  }
  const MapRange range{reduce_lo[0], reduce_hi[0], reduce_finite[0] != 0};
  __syncthreads();
  return range;
}

// The map scaled to [0, 1] (hi > lo) into scratch. Ends with a barrier.
template <typename scalar_t>
__device__ __forceinline__ void normalise_map(const scalar_t* m, int64_t size, const MapRange& range, double* out) {
  for (int64_t k = threadIdx.x; k < size; k += kBlock) out[k] = (double(m[k]) - range.lo) / (range.hi - range.lo);
  __syncthreads();
}

// The level's foreground mask, written as the initial union-find forest: a foreground pixel (upsampled value >=
// threshold, computed on the fly) is its own root, background is -1. Ends with a barrier.
__device__ __forceinline__ void threshold_pixels(const Scratch& s, int64_t h, int64_t w, int64_t H, int64_t W,
                                                 double threshold) {
  for (int64_t p = threadIdx.x; p < H * W; p += kBlock) {
    const bool fg = pixel_value(s.map, h, w, H, W, p / W, p % W) >= threshold;
    s.parent[p] = fg ? int32_t(p) : -1;
  }
  __syncthreads();
}

// 8-connectivity: each foreground pixel unites with the foreground among its left, up-left, up and up-right
// neighbours (the other four unite with it). Threads unite concurrently; unite's atomicMin makes that safe. Ends with
// a barrier, after which every component is one tree rooted at its raster-first pixel.
__device__ __forceinline__ void link_neighbours(int32_t* parent, int64_t H, int64_t W) {
  for (int64_t p = threadIdx.x; p < H * W; p += kBlock) {
    if (parent[p] < 0) continue;
    const int64_t y = p / W, x = p % W;
    if (x > 0 && parent[p - 1] >= 0) unite(parent, int32_t(p), int32_t(p - 1));
    if (y > 0) {
      for (int64_t dx = -1; dx <= 1; ++dx) {
        const int64_t nx = x + dx;
        if (nx >= 0 && nx < W && parent[p - W + dx] >= 0) unite(parent, int32_t(p), int32_t(p - W + dx));
      }
    }
  }
  __syncthreads();
}

// Points every foreground pixel straight at its root; each root clears its component record and appends itself to
// the compact list of roots (num_roots was zeroed before link_neighbours' barrier). The list's order depends on thread
// timing, which the selection's tie-break on the root index makes harmless. Ends with a barrier.
__device__ __forceinline__ void collect_roots(const Scratch& s, int64_t H, int64_t W, int32_t& num_roots) {
  for (int64_t p = threadIdx.x; p < H * W; p += kBlock) {
    if (s.parent[p] < 0) continue;
    const int32_t root = find_root(s.parent, int32_t(p));
    s.parent[p] = root;
    if (root == p) {
      s.x0[p] = int32_t(W), s.y0[p] = int32_t(H), s.x1[p] = 0, s.y1[p] = 0, s.count[p] = 0;
      s.max_bits[p] = 0ull, s.sum[p] = 0.0;
      s.roots[atomicAdd(&num_roots, 1)] = int32_t(p);
    }
  }
  __syncthreads();
}

// Each foreground pixel adds itself to its root's record with atomics: the box, the pixel count, and the max (through
// its bit pattern: the values are non-negative) and sum of its upsampled activation. Ends with a barrier.
__device__ __forceinline__ void accumulate_components(const Scratch& s, int64_t h, int64_t w, int64_t H, int64_t W) {
  for (int64_t p = threadIdx.x; p < H * W; p += kBlock) {
    const int32_t root = s.parent[p];
    if (root < 0) continue;
    const int64_t y = p / W, x = p % W;
    const double value = pixel_value(s.map, h, w, H, W, y, x);
    atomicMin(s.x0 + root, int32_t(x)), atomicMin(s.y0 + root, int32_t(y));
    atomicMax(s.x1 + root, int32_t(x + 1)), atomicMax(s.y1 + root, int32_t(y + 1));
    atomicAdd(s.count + root, 1);
    atomicMax(s.max_bits + root, static_cast<unsigned long long>(__double_as_longlong(value)));
    atomicAdd(s.sum + root, value);
  }
  __syncthreads();
}

// The score of each of the level's components, by its slot in the list of roots; scores are in [0, 1], so the
// selection marks a taken component with -1. Ends with a barrier.
__device__ __forceinline__ void score_components(const Scratch& s, int32_t roots, bool mean) {
  for (int64_t c = threadIdx.x; c < roots; c += kBlock) {
    const int32_t r = s.roots[c];
    s.rank_score[c] = mean ? s.sum[r] / double(s.count[r]) : __longlong_as_double(s.max_bits[r]);
  }
  __syncthreads();
}

// Whether slot a ranks before slot b: higher score, then the smaller root (earlier first pixel in raster order).
__device__ __forceinline__ bool outranks(const Scratch& s, int64_t a, int64_t b) {
  if (s.rank_score[a] != s.rank_score[b]) return s.rank_score[a] > s.rank_score[b];
  return s.roots[a] < s.roots[b];
}

// The slot of the best component not yet taken: a strided scan per thread, then a tree over the block in shared
// memory. Returns after the tree's last barrier, so every thread gets the same slot.
__device__ __forceinline__ int32_t block_best_component(const Scratch& s, int32_t roots, int32_t* reduce) {
  const int64_t tid = threadIdx.x;
  int32_t best = -1;
  for (int64_t c = tid; c < roots; c += kBlock) {
    if (s.rank_score[c] < 0) continue;  // taken
    if (best < 0 || outranks(s, c, best)) best = int32_t(c);
  }
  reduce[tid] = best;
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      const int32_t a = reduce[tid], b = reduce[tid + stride];
      if (b >= 0 && (a < 0 || outranks(s, b, a))) reduce[tid] = b;
    }
    __syncthreads();
  }
  return reduce[0];
}

// One thread's work: inserts cand into the map's ranked output of kept entries (at most max_boxes), shifting the
// lower ones down and dropping the last when full. Entries already there come from earlier levels, so they win ties
// on level: compare on score only. Returns false when cand falls outside the output (nothing changes).
__device__ __forceinline__ bool insert_ranked(const Candidate& cand, int64_t* out_boxes, double* out_scores,
                                              int64_t max_boxes, int64_t& kept) {
  int64_t pos = kept;
  while (pos > 0 && cand.score > out_scores[pos - 1]) --pos;
  if (pos < max_boxes) {
    for (int64_t k = kept < max_boxes - 1 ? kept : max_boxes - 1; k > pos; --k) {
      out_scores[k] = out_scores[k - 1];
      for (int e = 0; e < 4; ++e) out_boxes[k * 4 + e] = out_boxes[(k - 1) * 4 + e];
    }
    out_scores[pos] = cand.score;
    for (int e = 0; e < 4; ++e) out_boxes[pos * 4 + e] = cand.box[e];
    kept = kept + 1 < max_boxes ? kept + 1 : max_boxes;
  }
  return pos < max_boxes;
}

// Takes the level's components best first and inserts them into the map's ranked output until one falls outside it
// (the rest of the level ranks lower still): max_boxes rounds at most, one block-wide arg-max each. kept and stop are
// shared, written by thread 0 only. Ends with a barrier.
__device__ __forceinline__ void merge_level(const Scratch& s, int32_t roots, int64_t level, int64_t max_boxes,
                                            int64_t* out_boxes, double* out_scores, int32_t* reduce, int64_t& kept,
                                            bool& stop) {
  for (int64_t round = 0; round < max_boxes && round < roots; ++round) {
    const int32_t winner = block_best_component(s, roots, reduce);
    if (threadIdx.x == 0) {
      const int32_t r = s.roots[winner];
      const Candidate cand{s.rank_score[winner], level, int64_t(r), {s.x0[r], s.y0[r], s.x1[r], s.y1[r]}};
      s.rank_score[winner] = -1.0;  // taken
      stop = !insert_ranked(cand, out_boxes, out_scores, max_boxes, kept);
    }
    __syncthreads();
    if (stop) break;  // uniform: read after the barrier
  }
  __syncthreads();
}

// One block per map at a time (grid-stride over maps), in the block's own scratch slot.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) cam_boxes_kernel(const scalar_t* __restrict__ cams, int64_t N, int64_t h,
                                                            int64_t w, int64_t H, int64_t W,
                                                            Levels levels, int64_t max_boxes, bool mean,
                                                            uint8_t* arena, int64_t slot_bytes,
                                                            int64_t* __restrict__ boxes, double* __restrict__ scores,
                                                            int64_t* __restrict__ counts) {
  __shared__ double reduce_a[kBlock], reduce_b[kBlock];
  __shared__ int32_t reduce_i[kBlock];
  __shared__ int32_t num_roots;
  __shared__ int64_t kept;
  __shared__ bool stop;
  const Scratch s = Scratch::at(arena + blockIdx.x * slot_bytes, H * W, h * w);

  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* m = cams + n * h * w;
    const MapRange range = block_min_max(m, h * w, reduce_a, reduce_b, reduce_i);
    // Uniform over the block: a map with NaN or inf gets count -1, a constant map none (outputs are pre-zeroed).
    if (!range.finite && threadIdx.x == 0) counts[n] = -1;
    if (!range.finite || !(range.hi > range.lo)) continue;
    if (threadIdx.x == 0) kept = 0;
    normalise_map(m, h * w, range, s.map);
    int64_t total = 0;
    for (int64_t level = 0; level < levels.count; ++level) {
      threshold_pixels(s, h, w, H, W, levels.value[level]);
      if (threadIdx.x == 0) num_roots = 0;  // collect_roots' counter, zeroed before link_neighbours' barrier
      link_neighbours(s.parent, H, W);
      collect_roots(s, H, W, num_roots);
      accumulate_components(s, h, w, H, W);
      const int32_t roots = num_roots;
      total += roots;
      score_components(s, roots, mean);
      merge_level(s, roots, level, max_boxes, boxes + n * max_boxes * 4, scores + n * max_boxes, reduce_i, kept,
                  stop);
    }
    if (threadIdx.x == 0) counts[n] = total;
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_boxes_cuda(const at::Tensor& cams_in, at::IntArrayRef size,
                                                              at::ArrayRef<double> thresholds, int64_t max_boxes,
                                                              c10::string_view score) {
  check_cam_boxes_args(cams_in, size, thresholds, max_boxes, score);
  const c10::cuda::CUDAGuard guard(cams_in.device());
  const at::Tensor cams = cams_in.reshape({-1, cams_in.size(-2), cams_in.size(-1)}).contiguous();
  const int64_t N = cams.size(0), h = cams.size(1), w = cams.size(2), H = size[0], W = size[1];
  TORCH_CHECK(H * W < (int64_t(1) << 31), "cam_boxes: the CUDA kernel labels images of fewer than 2^31 pixels");
  TORCH_CHECK(int64_t(thresholds.size()) <= kMaxLevels, "cam_boxes: the CUDA kernel takes at most ", kMaxLevels,
              " thresholds, got ", thresholds.size());
  const auto options = cams.options();
  at::Tensor boxes = at::zeros({N, max_boxes, 4}, options.dtype(at::kLong));
  at::Tensor scores = at::zeros({N, max_boxes}, options.dtype(at::kDouble));
  at::Tensor counts = at::zeros({N}, options.dtype(at::kLong));
  const auto lead = cams_in.sizes().slice(0, cams_in.dim() - 2);
  std::vector<int64_t> box_shape(lead.begin(), lead.end()), score_shape(lead.begin(), lead.end());
  box_shape.insert(box_shape.end(), {max_boxes, 4});
  score_shape.push_back(max_boxes);
  if (N == 0) return {boxes.view(box_shape), scores.view(score_shape), counts.view(lead)};

  const int64_t pixels = H * W;
  const int64_t slot_bytes = pixels * Scratch::bytes_per_pixel() + h * w * 8;
  const int64_t slots = std::max<int64_t>(1, std::min({N, kMaxSlots, kScratchBudget / slot_bytes}));
  const int64_t aligned_bytes = (slot_bytes + 63) / 64 * 64;
  at::Tensor arena = at::empty({slots * aligned_bytes}, options.dtype(at::kByte));
  Levels levels{};
  levels.count = int64_t(thresholds.size());
  std::copy(thresholds.begin(), thresholds.end(), levels.value);
  const bool mean = score == "mean";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cams.scalar_type(), "cam_boxes_cuda", [&] {
    cam_boxes_kernel<scalar_t><<<slots, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cams.const_data_ptr<scalar_t>(), N, h, w, H, W, levels, max_boxes, mean, arena.mutable_data_ptr<uint8_t>(),
        aligned_bytes, boxes.mutable_data_ptr<int64_t>(), scores.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {boxes.view(box_shape), scores.view(score_shape), counts.view(lead)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CUDA, m) { m.impl("cam_boxes", &cam_boxes_cuda); }

}  // namespace dmfast
