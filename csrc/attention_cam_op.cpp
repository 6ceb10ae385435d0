#include "attention_cam_op.h"

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include "checks.h"

namespace dmfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cam_forward(const at::Tensor& features,
                                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                                     const std::optional<at::Tensor>& masks,
                                                                     const AttentionCamPasses& passes) {
  check_attention_cam_args(features, weight, masks);
  check_attention_cam_bias(bias, weight);
  const int64_t B = features.size(0), K = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t C = weight.size(0);
  // [C, K] x [B, K, h w] -> [B, C, h w]: one batched BLAS call, the weight broadcast with a zero batch stride.
  const at::Tensor plain = at::bmm(weight.expand({B, C, K}), features.reshape({B, K, h * w})).view({B, C, h, w});
  at::Tensor cams = at::empty({B, C, h, w}, plain.options());
  at::Tensor logits = at::empty({B, C}, plain.options());
  passes.scale_and_mean(plain, masks.has_value() ? masks->contiguous() : at::Tensor(), bias.contiguous(), cams,
                        logits);
  return {logits, cams, plain};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cam_backward(
    const std::optional<at::Tensor>& grad_logits_in, const std::optional<at::Tensor>& grad_cams_in,
    const std::optional<at::Tensor>& grad_plain_in, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& plain_in, const std::optional<at::Tensor>& masks_in, std::array<bool, 4> output_mask,
    const AttentionCamPasses& passes) {
  check_attention_cam_args(features, weight, masks_in);
  const int64_t B = features.size(0), K = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t C = weight.size(0);
  const char* op = "attention_cam_backward";
  const std::array<int64_t, 4> cam_dims{B, C, h, w};
  const at::IntArrayRef cam_shape(cam_dims);
  TORCH_CHECK(plain_in.sizes() == cam_shape, op, ": plain_cams must be ", cam_shape, ", got ", plain_in.sizes());
  check_same(op, "plain_cams", plain_in, "features", features);
  for (const auto* grad : {&grad_cams_in, &grad_plain_in}) {
    if (!grad->has_value()) continue;
    TORCH_CHECK((*grad)->sizes() == cam_shape, op, ": gradients of the maps must be ", cam_shape, ", got ",
                (*grad)->sizes());
    check_same(op, "map gradient", **grad, "features", features);
  }
  if (grad_logits_in.has_value()) {
    TORCH_CHECK(grad_logits_in->dim() == 2 && grad_logits_in->size(0) == B && grad_logits_in->size(1) == C, op, ": grad_logits must be [", B, ", ", C,
                "], got ", grad_logits_in->sizes());
    check_same(op, "grad_logits", *grad_logits_in, "features", features);
  }
  const auto options = features.options();
  const at::Tensor empty = at::empty({0}, options);
  const at::Tensor grad_logits = grad_logits_in.has_value() ? grad_logits_in->contiguous() : at::zeros({B, C}, options);
  const bool need_masks = output_mask[3] && masks_in.has_value();

  if (!masks_in.has_value() && !grad_cams_in.has_value() && !grad_plain_in.has_value()) {
    // Plain CAM head trained on its logits only: every pixel of map (b, c) receives grad_logits[b, c] / (h w), so
    // d features is constant over the pixels (returned broadcast, as mean's backward does) and d weight needs
    // only the spatially averaged features.
    const double inv_s = 1.0 / double(h * w);
    at::Tensor grad_features =
        output_mask[0] ? at::mm(grad_logits, weight).mul_(inv_s).view({B, K, 1, 1}).expand({B, K, h, w}) : empty;
    at::Tensor grad_weight = output_mask[1] ? at::mm(grad_logits.t(), features.mean({2, 3})) : empty;
    return {grad_features, grad_weight, output_mask[2] ? grad_logits.sum(0) : empty, empty};
  }

  const at::Tensor plain = plain_in.contiguous();
  const at::Tensor masks = masks_in.has_value() ? masks_in->contiguous() : at::Tensor();
  const at::Tensor grad_cams = grad_cams_in.has_value() ? grad_cams_in->contiguous() : at::zeros(cam_shape, options);
  const at::Tensor grad_plain =
      grad_plain_in.has_value() ? grad_plain_in->contiguous() : at::zeros(cam_shape, options);
  at::Tensor grad_plain_total = at::empty({B, C, h * w}, options);
  at::Tensor grad_masks = need_masks ? at::empty_like(masks) : at::Tensor();
  passes.scale_and_mean_backward(grad_logits, grad_cams, grad_plain, plain, masks, grad_plain_total, grad_masks);
  at::Tensor grad_features =
      output_mask[0] ? at::bmm(weight.t().expand({B, K, C}), grad_plain_total).view({B, K, h, w}) : empty;
  at::Tensor grad_weight =
      output_mask[1] ? at::bmm(grad_plain_total, features.reshape({B, K, h * w}).transpose(1, 2)).sum(0) : empty;
  return {grad_features, grad_weight, output_mask[2] ? grad_logits.sum(0) : empty, need_masks ? grad_masks : empty};
}

}  // namespace dmfast
