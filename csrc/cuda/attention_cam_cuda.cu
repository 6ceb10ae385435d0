// CUDA passes of dmfast::attention_cam around cuBLAS (see attention_cam_op.cpp): mask scaling + spatial mean +
// bias in one warp per map, and their backward elementwise, with the shared-mask gradient summed per element
// over the batch in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../attention.h"
#include "../attention_cam_op.h"
#include "launch.cuh"

namespace dmfast {
namespace {

// One warp per (image, class) map.
template <typename scalar_t>
__global__ void scale_and_mean_kernel(const scalar_t* __restrict__ plain, const scalar_t* __restrict__ masks,
                                      bool per_image, const scalar_t* __restrict__ bias, int64_t rows, int64_t C,
                                      int64_t S, scalar_t* __restrict__ cams, scalar_t* __restrict__ logits) {
  using T = at::opmath_type<scalar_t>;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together
  const scalar_t* p = plain + row * S;
  const scalar_t* m = masks ? masks + (per_image ? row : row % C) * S : nullptr;
  T sum = 0;
  for (int64_t s = lane; s < S; s += kWarp) {
    const T value = m ? attend(T(p[s]), T(m[s])) : T(p[s]);
    cams[row * S + s] = scalar_t(value);
    sum += value;
  }
  sum = warp_sum(sum);
  if (lane == 0) logits[row] = scalar_t(sum / T(S) + T(bias[row % C]));
}

template <typename scalar_t>
__global__ void scale_and_mean_backward_kernel(const scalar_t* __restrict__ grad_logits,
                                               const scalar_t* __restrict__ grad_cams,
                                               const scalar_t* __restrict__ grad_plain,
                                               const scalar_t* __restrict__ plain, const scalar_t* __restrict__ masks,
                                               bool per_image, int64_t total, int64_t C, int64_t S,
                                               scalar_t* __restrict__ grad_plain_total,
                                               scalar_t* __restrict__ grad_masks_per_image) {
  using T = at::opmath_type<scalar_t>;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t row = index / S, s = index % S;
  const T per_pixel = T(grad_logits[row]) / T(S);
  if (!masks) {
    grad_plain_total[index] = scalar_t(T(grad_cams[index]) + per_pixel + T(grad_plain[index]));
    return;
  }
  const T psi = T(masks[(per_image ? row : row % C) * S + s]);
  T grad_psi;
  grad_plain_total[index] =
      scalar_t(attention_cam_grad(T(grad_cams[index]), per_pixel, T(grad_plain[index]), T(plain[index]), psi,
                                  &grad_psi));
  if (grad_masks_per_image) grad_masks_per_image[index] = scalar_t(grad_psi);
}

// Shared masks: thread per (class, pixel) sums the batch in order.
template <typename scalar_t>
__global__ void shared_mask_grad_kernel(const scalar_t* __restrict__ grad_logits,
                                        const scalar_t* __restrict__ grad_cams, const scalar_t* __restrict__ plain,
                                        int64_t B, int64_t C, int64_t S, scalar_t* __restrict__ grad_masks) {
  using T = at::opmath_type<scalar_t>;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= C * S) return;
  const int64_t c = index / S, s = index % S;
  T acc = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = (b * C + c) * S + s;
    acc += (T(grad_cams[o]) + T(grad_logits[b * C + c]) / T(S)) * T(plain[o]);
  }
  grad_masks[index] = scalar_t(acc);
}

void scale_and_mean_cuda(const at::Tensor& plain, const at::Tensor& masks, const at::Tensor& bias, at::Tensor& cams,
                         at::Tensor& logits) {
  const c10::cuda::CUDAGuard guard(plain.device());
  const int64_t rows = plain.size(0) * plain.size(1), C = plain.size(1), S = plain.size(2) * plain.size(3);
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plain.scalar_type(), "attention_cam_cuda", [&] {
    scale_and_mean_kernel<scalar_t><<<blocks_for(rows * kWarp), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        plain.const_data_ptr<scalar_t>(), masks.defined() ? masks.const_data_ptr<scalar_t>() : nullptr,
        masks.defined() && masks.dim() == 4, bias.const_data_ptr<scalar_t>(), rows, C, S,
        cams.mutable_data_ptr<scalar_t>(), logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_and_mean_backward_cuda(const at::Tensor& grad_logits, const at::Tensor& grad_cams,
                                  const at::Tensor& grad_plain, const at::Tensor& plain, const at::Tensor& masks,
                                  at::Tensor& grad_plain_total, at::Tensor& grad_masks) {
  const c10::cuda::CUDAGuard guard(plain.device());
  const int64_t B = plain.size(0), C = plain.size(1), S = plain.size(2) * plain.size(3);
  const bool per_image = masks.defined() && masks.dim() == 4;
  if (plain.numel() == 0) {
    if (grad_masks.defined()) grad_masks.zero_();
    return;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plain.scalar_type(), "attention_cam_backward_cuda", [&] {
    scale_and_mean_backward_kernel<scalar_t><<<blocks_for(plain.numel()), kThreads, 0, stream>>>(
        grad_logits.const_data_ptr<scalar_t>(), grad_cams.const_data_ptr<scalar_t>(),
        grad_plain.const_data_ptr<scalar_t>(), plain.const_data_ptr<scalar_t>(),
        masks.defined() ? masks.const_data_ptr<scalar_t>() : nullptr, per_image, plain.numel(), C, S,
        grad_plain_total.mutable_data_ptr<scalar_t>(),
        per_image && grad_masks.defined() ? grad_masks.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (masks.defined() && !per_image && grad_masks.defined()) {
      shared_mask_grad_kernel<scalar_t><<<blocks_for(C * S), kThreads, 0, stream>>>(
          grad_logits.const_data_ptr<scalar_t>(), grad_cams.const_data_ptr<scalar_t>(),
          plain.const_data_ptr<scalar_t>(), B, C, S, grad_masks.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

constexpr AttentionCamPasses kCudaPasses{&scale_and_mean_cuda, &scale_and_mean_backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CUDA, m) {
  m.impl("attention_cam", &attention_cam_kernel<&kCudaPasses>);
  m.impl("attention_cam_backward", &attention_cam_backward_kernel<&kCudaPasses>);
}

}  // namespace dmfast
