// CPU kernels of dmfast::mask_attention (Eq. 4, f' = (1 + psi) f) and its backward. The backward makes one pass:
// each task owns a slice of one mask plane, visits every feature plane that reads it in a fixed order, writes
// their feature gradient and sums the mask gradient, so the result is deterministic and race-free.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../attention.h"
#include "../checks.h"

namespace dmfast {
namespace {

constexpr int64_t kSlice = 2048;       // spatial positions per backward task
constexpr int64_t kReaderChunks = 32;  // feature planes reading one mask are split into at most this many tasks
constexpr int64_t kMinTasks = 64;

template <typename scalar_t>
void mask_attention_forward(const scalar_t* f, const scalar_t* m, int64_t B, int64_t K, int64_t S, int64_t mask_batch,
                            int64_t mask_channels, scalar_t* out) {
  at::parallel_for(0, B * K, std::max<int64_t>(1, 16384 / S), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* fp = f + plane * S;
      const scalar_t* mp = m + mask_plane(plane / K, plane % K, mask_batch, mask_channels) * S;
      scalar_t* op = out + plane * S;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) op[s] = attend(fp[s], mp[s]);
    }
  });
}

at::Tensor mask_attention_cpu(const at::Tensor& features_in, const at::Tensor& masks_in) {
  check_mask_attention_args(features_in, masks_in);
  const at::Tensor features = features_in.contiguous(), masks = masks_in.contiguous();
  const int64_t B = features.size(0), K = features.size(1), S = features.size(2) * features.size(3);
  at::Tensor out = at::empty_like(features);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "mask_attention_cpu", [&] {
    mask_attention_forward(features.const_data_ptr<scalar_t>(), masks.const_data_ptr<scalar_t>(), B, K, S,
                           masks.size(0), masks.size(1), out.data_ptr<scalar_t>());
  });
  return out;
}

// One pass over the gradient: feature gradients are written as they are visited, mask gradients summed.
// gf / gm are null when not wanted.
template <typename scalar_t>
void mask_attention_backward(const scalar_t* g, const scalar_t* f, const scalar_t* m, int64_t B, int64_t K, int64_t S,
                             int64_t mask_batch, int64_t mask_channels, scalar_t* gf, scalar_t* gm) {
  const bool need_features = gf != nullptr, need_masks = gm != nullptr;
  // Feature planes reading mask plane (mb, mk): b in {mb} or all of B, k in {mk} or all of K. They are split into
  // a fixed number of chunks (independent of the thread count) whose partial mask gradients are summed in order.
  const int64_t readers_b = mask_batch == 1 ? B : 1, readers_k = mask_channels == 1 ? K : 1;
  const int64_t readers = readers_b * readers_k;
  const int64_t slice_len = std::min(kSlice, S), slices = (S + slice_len - 1) / slice_len;
  const int64_t mask_planes = mask_batch * mask_channels;
  // Enough tasks to keep the cores busy, and no partial sums when the mask planes alone give that.
  const int64_t chunks = std::clamp<int64_t>((kMinTasks + mask_planes * slices - 1) / (mask_planes * slices), 1,
                                             std::min(readers, kReaderChunks));
  using acc_t = at::acc_type<scalar_t, false>;
  std::vector<acc_t> partial(need_masks && chunks > 1 ? mask_planes * slices * chunks * slice_len : 0);
  at::parallel_for(0, mask_planes * slices * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(slice_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, slice = (task / chunks) % slices, mplane = task / (chunks * slices);
      const int64_t s0 = slice * slice_len, n = std::min(slice_len, S - s0);
      const int64_t mb = mplane / mask_channels, mk = mplane % mask_channels;
      const scalar_t* mp = m + mplane * S + s0;
      std::fill(acc.begin(), acc.begin() + n, acc_t(0));
      for (int64_t reader = chunk * readers / chunks; reader < (chunk + 1) * readers / chunks; ++reader) {
        const int64_t b = mask_batch == 1 ? reader / readers_k : mb;
        const int64_t k = mask_channels == 1 ? reader % readers_k : mk;
        const int64_t offset = (b * K + k) * S + s0;
        const scalar_t* gp = g + offset;
        if (need_features) {
          scalar_t* out = gf + offset;
#pragma omp simd
          for (int64_t s = 0; s < n; ++s) out[s] = attend(gp[s], mp[s]);
        }
        if (need_masks) {
          const scalar_t* fp = f + offset;
#pragma omp simd
          for (int64_t s = 0; s < n; ++s) acc[s] += acc_t(gp[s]) * acc_t(fp[s]);
        }
      }
      if (!need_masks) continue;
      if (chunks == 1) {
        for (int64_t s = 0; s < n; ++s) gm[mplane * S + s0 + s] = scalar_t(acc[s]);
      } else {
        std::copy(acc.begin(), acc.begin() + n, partial.begin() + task * slice_len);
      }
    }
  });
  if (need_masks && chunks > 1) {
    at::parallel_for(0, mask_planes * slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t mplane = block / slices, s0 = (block % slices) * slice_len, n = std::min(slice_len, S - s0);
        for (int64_t s = 0; s < n; ++s) {
          acc_t total = 0;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[(block * chunks + chunk) * slice_len + s];
          gm[mplane * S + s0 + s] = scalar_t(total);
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> mask_attention_backward_cpu(const at::Tensor& grad_in, const at::Tensor& features_in,
                                                               const at::Tensor& masks_in,
                                                               std::array<bool, 2> output_mask) {
  check_mask_attention_args(features_in, masks_in);
  check_mask_attention_grad(grad_in, features_in);
  const at::Tensor grad = grad_in.contiguous(), features = features_in.contiguous(), masks = masks_in.contiguous();
  const int64_t B = features.size(0), K = features.size(1), S = features.size(2) * features.size(3);
  const int64_t mask_batch = masks.size(0), mask_channels = masks.size(1);
  const bool need_features = output_mask[0], need_masks = output_mask[1];
  at::Tensor grad_features = need_features ? at::empty_like(features) : at::empty({0}, features.options());
  at::Tensor grad_masks = need_masks ? at::empty_like(masks) : at::empty({0}, masks.options());
  if (!need_features && !need_masks) return {grad_features, grad_masks};

  if (features.numel() == 0) {
    if (need_masks) grad_masks.zero_();
    return {grad_features, grad_masks};
  }
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "mask_attention_backward_cpu", [&] {
    mask_attention_backward(grad.const_data_ptr<scalar_t>(), features.const_data_ptr<scalar_t>(),
                            masks.const_data_ptr<scalar_t>(), B, K, S, mask_batch, mask_channels,
                            need_features ? grad_features.data_ptr<scalar_t>() : nullptr,
                            need_masks ? grad_masks.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_features, grad_masks};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CPU, m) {
  m.impl("mask_attention", &mask_attention_cpu);
  m.impl("mask_attention_backward", &mask_attention_backward_cpu);
}

}  // namespace dmfast
