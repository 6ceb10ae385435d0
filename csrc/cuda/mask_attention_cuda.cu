// CUDA kernels of dmfast::mask_attention and its backward. The mask gradient sums the feature planes that read
// each mask element in fixed chunks, then adds the chunks with at::sum: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../attention.h"
#include "../checks.h"
#include "launch.cuh"

namespace dmfast {
namespace {

constexpr int64_t kTargetThreads = 1 << 16;  // enough mask-gradient threads to fill a GPU

template <typename scalar_t>
__global__ void mask_attention_kernel(const scalar_t* __restrict__ features, const scalar_t* __restrict__ masks,
                                      int64_t total, int64_t K, int64_t S, int64_t mask_batch, int64_t mask_channels,
                                      scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t plane = index / S, s = index % S;
  const scalar_t psi = masks[mask_plane(plane / K, plane % K, mask_batch, mask_channels) * S + s];
  out[index] = scalar_t(attend(T(features[index]), T(psi)));
}

// Thread (chunk, mask element) sums grad * features over its chunk of the feature planes that read the element.
template <typename scalar_t, typename acc_t>
__global__ void mask_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ features,
                                 int64_t mask_numel, int64_t chunks, int64_t readers, int64_t readers_k, int64_t K,
                                 int64_t S, int64_t mask_batch, int64_t mask_channels, acc_t* __restrict__ partial) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= mask_numel * chunks) return;
  const int64_t element = index % mask_numel, chunk = index / mask_numel;
  const int64_t mplane = element / S, s = element % S;
  const int64_t mb = mplane / mask_channels, mk = mplane % mask_channels;
  acc_t acc = 0;
  for (int64_t reader = chunk * readers / chunks; reader < (chunk + 1) * readers / chunks; ++reader) {
    const int64_t b = mask_batch == 1 ? reader / readers_k : mb;
    const int64_t k = mask_channels == 1 ? reader % readers_k : mk;
    const int64_t offset = (b * K + k) * S + s;
    acc += acc_t(grad[offset]) * acc_t(features[offset]);
  }
  partial[index] = acc;
}

at::Tensor mask_attention_cuda(const at::Tensor& features_in, const at::Tensor& masks_in) {
  check_mask_attention_args(features_in, masks_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous(), masks = masks_in.contiguous();
  const int64_t K = features.size(1), S = features.size(2) * features.size(3);
  at::Tensor out = at::empty_like(features);
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "mask_attention_cuda", [&] {
    mask_attention_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        features.const_data_ptr<scalar_t>(), masks.const_data_ptr<scalar_t>(), out.numel(), K, S, masks.size(0),
        masks.size(1), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_attention_backward_cuda(const at::Tensor& grad_in,
                                                                const at::Tensor& features_in,
                                                                const at::Tensor& masks_in,
                                                                std::array<bool, 2> output_mask) {
  check_mask_attention_args(features_in, masks_in);
  check_mask_attention_grad(grad_in, features_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor grad = grad_in.contiguous(), features = features_in.contiguous(), masks = masks_in.contiguous();
  const int64_t B = features.size(0), K = features.size(1), S = features.size(2) * features.size(3);
  const int64_t mask_batch = masks.size(0), mask_channels = masks.size(1);
  at::Tensor grad_features = at::empty({0}, features.options());
  at::Tensor grad_masks = at::empty({0}, masks.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (output_mask[0]) {
    grad_features = at::empty_like(features);
    if (grad.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_attention_grad_cuda", [&] {
        mask_attention_kernel<scalar_t><<<blocks_for(grad.numel()), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), masks.const_data_ptr<scalar_t>(), grad.numel(), K, S, mask_batch,
            mask_channels, grad_features.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  if (output_mask[1]) {
    const int64_t readers_k = mask_channels == 1 ? K : 1;
    const int64_t readers = (mask_batch == 1 ? B : 1) * readers_k, mask_numel = masks.numel();
    if (readers == 0) return {grad_features, at::zeros_like(masks)};
    const int64_t chunks = std::clamp<int64_t>(kTargetThreads / std::max<int64_t>(mask_numel, 1), 1, readers);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_attention_mask_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor partial = at::empty({chunks, mask_numel}, masks.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      mask_grad_kernel<scalar_t, acc_t><<<blocks_for(partial.numel()), kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), features.const_data_ptr<scalar_t>(), mask_numel, chunks, readers,
          readers_k, K, S, mask_batch, mask_channels, partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_masks = partial.sum(0).view(masks.sizes()).to(masks.scalar_type());
    });
  }
  return {grad_features, grad_masks};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CUDA, m) {
  m.impl("mask_attention", &mask_attention_cuda);
  m.impl("mask_attention_backward", &mask_attention_backward_cuda);
}

}  // namespace dmfast
