// Argument checks shared by the CPU and CUDA kernels: every message names the argument and what was wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/Exception.h>

namespace dmfast {

inline void check_affine_smooth_args(const at::Tensor& images, const at::Tensor& theta, int64_t pool,
                                     c10::DeviceType device_type) {
  TORCH_CHECK(images.dim() == 4, "affine_smooth: images must be [B, C, H, W], got a ", images.dim(),
              "-d tensor of shape ", images.sizes());
  TORCH_CHECK(theta.dim() == 3 && theta.size(1) == 2 && theta.size(2) == 3,
              "affine_smooth: theta must be [B, 2, 3], got shape ", theta.sizes());
  TORCH_CHECK(theta.size(0) == images.size(0), "affine_smooth: batch sizes differ: images has ", images.size(0),
              " images but theta has ", theta.size(0), " matrices");
  TORCH_CHECK(pool >= 1, "affine_smooth: pool must be >= 1, got ", pool);
  TORCH_CHECK(images.size(2) > 0 && images.size(3) > 0 && images.size(1) > 0,
              "affine_smooth: images must have C, H and W > 0, got shape ", images.sizes());
  TORCH_CHECK(images.size(2) % pool == 0 && images.size(3) % pool == 0, "affine_smooth: H and W (", images.size(2),
              "x", images.size(3), ") must be divisible by pool=", pool);
  TORCH_CHECK(images.device().type() == device_type && theta.device() == images.device(),
              "affine_smooth: images and theta must be on the same device, got images on ", images.device(),
              " and theta on ", theta.device());
  const auto dtype = images.scalar_type();
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || (reduced && device_type == c10::DeviceType::CUDA),
              "affine_smooth: images must be float32 or float64", device_type == c10::DeviceType::CUDA ?
              " (or float16/bfloat16 on CUDA)" : " on CPU", ", got ", dtype);
  TORCH_CHECK(theta.scalar_type() == dtype || (reduced && theta.scalar_type() == at::kFloat),
              "affine_smooth: theta dtype ", theta.scalar_type(), " does not match images dtype ", dtype);
  TORCH_CHECK(at::isfinite(theta).all().item<bool>(), "affine_smooth: theta contains NaN or infinite values");
}

inline void check_affine_smooth_grad(const at::Tensor& grad, const at::Tensor& images) {
  TORCH_CHECK(grad.sizes() == images.sizes(), "affine_smooth_backward: grad_output shape ", grad.sizes(),
              " does not match images shape ", images.sizes());
  TORCH_CHECK(grad.scalar_type() == images.scalar_type() && grad.device() == images.device(),
              "affine_smooth_backward: grad_output must have the dtype and device of images, got ",
              grad.scalar_type(), " on ", grad.device());
}

}  // namespace dmfast
