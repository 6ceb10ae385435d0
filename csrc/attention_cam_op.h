// The device-independent part of dmfast::attention_cam: argument checks, the BLAS contractions through ATen and
// the choice of backward path. Each device supplies the two fused passes over the [B, C, h, w] maps.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace dmfast {

struct AttentionCamPasses {
  // cams = (1 + masks) * plain (masks may be undefined), logits = spatial mean of cams + bias. All contiguous.
  void (*scale_and_mean)(const at::Tensor& plain, const at::Tensor& masks, const at::Tensor& bias, at::Tensor& cams,
                         at::Tensor& logits);
  // grad_plain_total = d plain_cams through every path; grad_masks (when defined) = d masks.
  void (*scale_and_mean_backward)(const at::Tensor& grad_logits, const at::Tensor& grad_cams,
                                  const at::Tensor& grad_plain, const at::Tensor& plain, const at::Tensor& masks,
                                  at::Tensor& grad_plain_total, at::Tensor& grad_masks);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cam_forward(const at::Tensor& features,
                                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                                     const std::optional<at::Tensor>& masks,
                                                                     const AttentionCamPasses& passes);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cam_backward(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_cams,
    const std::optional<at::Tensor>& grad_plain_cams, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& plain_cams, const std::optional<at::Tensor>& masks, std::array<bool, 4> output_mask,
    const AttentionCamPasses& passes);

// Kernel entry points for TORCH_LIBRARY_IMPL, one instantiation per device's passes.
template <const AttentionCamPasses* kPasses>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cam_kernel(const at::Tensor& features, const at::Tensor& weight,
                                                                    const at::Tensor& bias,
                                                                    const std::optional<at::Tensor>& masks) {
  return attention_cam_forward(features, weight, bias, masks, *kPasses);
}

template <const AttentionCamPasses* kPasses>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cam_backward_kernel(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_cams,
    const std::optional<at::Tensor>& grad_plain_cams, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& plain_cams, const std::optional<at::Tensor>& masks, std::array<bool, 4> output_mask) {
  return attention_cam_backward(grad_logits, grad_cams, grad_plain_cams, features, weight, plain_cams, masks,
                                output_mask, *kPasses);
}

}  // namespace dmfast
