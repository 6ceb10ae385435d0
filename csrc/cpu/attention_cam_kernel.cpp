// CPU kernels of dmfast::attention_cam (Eq. 5 with Eq. 4's attention folded in): the channel contraction is one
// BLAS batched matmul through ATen; the mask scaling, the spatial mean and the bias are one fused pass over the
// small [B, C, h, w] maps, and so is their backward (d plain_cams, d masks), around two more matmuls.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../attention.h"
#include "../attention_cam_op.h"

namespace dmfast {
namespace {

constexpr int64_t kSlice = 1024;  // spatial positions per task of the shared-mask backward

// cams = (1 + masks) * plain (or plain when m is null) and logits = spatial mean of cams + bias, in one pass.
template <typename scalar_t>
void scale_and_mean(const scalar_t* p, const scalar_t* m, bool per_image, const scalar_t* bias, int64_t B, int64_t C,
                    int64_t S, scalar_t* cams, scalar_t* logits) {
  using acc_t = at::acc_type<scalar_t, false>;
  at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / S), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* pr = p + row * S;
      scalar_t* o = cams + row * S;
      acc_t sum = 0;
      if (m) {
        const scalar_t* mr = m + (per_image ? row : row % C) * S;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < S; ++s) {
          o[s] = attend(pr[s], mr[s]);
          sum += acc_t(o[s]);
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < S; ++s) {
          o[s] = pr[s];
          sum += acc_t(pr[s]);
        }
      }
      logits[row] = scalar_t(sum / acc_t(S) + acc_t(bias[row % C]));
    }
  });
}

// Backward of scale_and_mean: dp = d plain_cams (all paths), dm = d masks (null when not wanted).
template <typename scalar_t>
void scale_and_mean_backward(const scalar_t* gl, const scalar_t* gc, const scalar_t* gp, const scalar_t* p,
                             const scalar_t* m, bool per_image, int64_t B, int64_t C, int64_t S, scalar_t* dp,
                             scalar_t* dm) {
  using acc_t = at::acc_type<scalar_t, false>;
  const scalar_t inv_s = scalar_t(1) / scalar_t(S);
  if (!m || per_image) {
    // Every element's mask gradient is its own: one task per (image, class) row.
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / S), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t per_pixel = gl[row] * inv_s;
        const int64_t o = row * S;
        if (!m) {
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) dp[o + s] = gc[o + s] + per_pixel + gp[o + s];
        } else {
          for (int64_t s = 0; s < S; ++s) {
            scalar_t grad_psi;
            dp[o + s] = attention_cam_grad(gc[o + s], per_pixel, gp[o + s], p[o + s], m[o + s], &grad_psi);
            if (dm) dm[o + s] = grad_psi;
          }
        }
      }
    });
  } else {
    // Masks shared by the batch: a task owns (class, slice of positions) and sums over images in order.
    const int64_t slices = (S + kSlice - 1) / kSlice;
    at::parallel_for(0, C * slices, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kSlice);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / slices, s0 = (task % slices) * kSlice, n = std::min(kSlice, S - s0);
        const scalar_t* mr = m + c * S + s0;
        std::fill(acc.begin(), acc.begin() + n, acc_t(0));
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = (b * C + c) * S + s0;
          const scalar_t per_pixel = gl[b * C + c] * inv_s;
          for (int64_t s = 0; s < n; ++s) {
            scalar_t grad_psi;
            dp[o + s] = attention_cam_grad(gc[o + s], per_pixel, gp[o + s], p[o + s], mr[s], &grad_psi);
            acc[s] += acc_t(grad_psi);
          }
        }
        if (dm) {
          for (int64_t s = 0; s < n; ++s) dm[c * S + s0 + s] = scalar_t(acc[s]);
        }
      }
    });
  }
}

void scale_and_mean_cpu(const at::Tensor& plain, const at::Tensor& masks, const at::Tensor& bias, at::Tensor& cams,
                        at::Tensor& logits) {
  const int64_t B = plain.size(0), C = plain.size(1), S = plain.size(2) * plain.size(3);
  AT_DISPATCH_FLOATING_TYPES(plain.scalar_type(), "attention_cam_cpu", [&] {
    scale_and_mean(plain.const_data_ptr<scalar_t>(), masks.defined() ? masks.const_data_ptr<scalar_t>() : nullptr,
                   masks.defined() && masks.dim() == 4, bias.const_data_ptr<scalar_t>(), B, C, S,
                   cams.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>());
  });
}

void scale_and_mean_backward_cpu(const at::Tensor& grad_logits, const at::Tensor& grad_cams,
                                 const at::Tensor& grad_plain, const at::Tensor& plain, const at::Tensor& masks,
                                 at::Tensor& grad_plain_total, at::Tensor& grad_masks) {
  const int64_t B = plain.size(0), C = plain.size(1), S = plain.size(2) * plain.size(3);
  AT_DISPATCH_FLOATING_TYPES(plain.scalar_type(), "attention_cam_backward_cpu", [&] {
    scale_and_mean_backward(grad_logits.const_data_ptr<scalar_t>(), grad_cams.const_data_ptr<scalar_t>(),
                            grad_plain.const_data_ptr<scalar_t>(), plain.const_data_ptr<scalar_t>(),
                            masks.defined() ? masks.const_data_ptr<scalar_t>() : nullptr,
                            masks.defined() && masks.dim() == 4, B, C, S, grad_plain_total.data_ptr<scalar_t>(),
                            grad_masks.defined() ? grad_masks.data_ptr<scalar_t>() : nullptr);
  });
}

constexpr AttentionCamPasses kCpuPasses{&scale_and_mean_cpu, &scale_and_mean_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CPU, m) {
  m.impl("attention_cam", &attention_cam_kernel<&kCpuPasses>);
  m.impl("attention_cam_backward", &attention_cam_backward_kernel<&kCpuPasses>);
}

}  // namespace dmfast
