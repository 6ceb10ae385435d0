// Argument checks shared by the CPU and CUDA kernels: every message names the argument and what was wrong. They
// read only shapes, dtypes and devices, never tensor values, so no check waits for the GPU (non-finite values are
// the kernels' business: see theta_in_domain and cam_boxes' count -1).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace dmfast {

// Float dtypes the kernels take: float32/float64, plus float16/bfloat16 on CUDA.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  const bool cuda = t.device().is_cuda();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || (cuda && (dtype == at::kHalf || dtype == at::kBFloat16)),
              op, ": ", name, " must be float32 or float64", cuda ? " (or float16/bfloat16)" : " on CPU", ", got ",
              dtype);
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type());
}

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
  check_float_dtype("affine_smooth", "images", images);
  const auto dtype = images.scalar_type();
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(theta.scalar_type() == dtype || (reduced && theta.scalar_type() == at::kFloat),
              "affine_smooth: theta dtype ", theta.scalar_type(), " does not match images dtype ", dtype);
}

inline void check_affine_smooth_grad(const at::Tensor& grad, const at::Tensor& images) {
  TORCH_CHECK(grad.sizes() == images.sizes(), "affine_smooth_backward: grad_output shape ", grad.sizes(),
              " does not match images shape ", images.sizes());
  TORCH_CHECK(grad.scalar_type() == images.scalar_type() && grad.device() == images.device(),
              "affine_smooth_backward: grad_output must have the dtype and device of images, got ",
              grad.scalar_type(), " on ", grad.device());
}

inline void check_mask_attention_args(const at::Tensor& features, const at::Tensor& masks) {
  const char* op = "mask_attention";
  TORCH_CHECK(features.dim() == 4, op, ": features must be [B, K, h, w], got shape ", features.sizes());
  TORCH_CHECK(masks.dim() == 4, op, ": masks must be [B or 1, K or 1, h, w], got shape ", masks.sizes());
  TORCH_CHECK((masks.size(0) == 1 || masks.size(0) == features.size(0)) &&
                  (masks.size(1) == 1 || masks.size(1) == features.size(1)) && masks.size(2) == features.size(2) &&
                  masks.size(3) == features.size(3),
              op, ": masks of shape ", masks.sizes(), " do not broadcast to features of shape ", features.sizes(),
              " (expected [B or 1, K or 1, h, w])");
  check_float_dtype(op, "features", features);
  check_same(op, "masks", masks, "features", features);
}

inline void check_mask_attention_grad(const at::Tensor& grad, const at::Tensor& features) {
  TORCH_CHECK(grad.sizes() == features.sizes(), "mask_attention_backward: grad_output shape ", grad.sizes(),
              " does not match features shape ", features.sizes());
  check_same("mask_attention_backward", "grad_output", grad, "features", features);
}

// features, weight and masks of attention_cam and its backward; the forward also checks bias.
inline void check_attention_cam_args(const at::Tensor& features, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& masks) {
  const char* op = "attention_cam";
  TORCH_CHECK(features.dim() == 4, op, ": features must be [B, K, h, w], got shape ", features.sizes());
  TORCH_CHECK(features.size(2) > 0 && features.size(3) > 0, op, ": features need h, w > 0, got shape ",
              features.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features.size(1), op, ": weight must be [C, K] with K = ",
              features.size(1), " (the features' channels), got shape ", weight.sizes());
  check_float_dtype(op, "features", features);
  check_same(op, "weight", weight, "features", features);
  if (masks.has_value()) {
    const auto& m = *masks;
    const bool shared = m.dim() == 3 && m.size(0) == weight.size(0);
    const bool per_image = m.dim() == 4 && m.size(0) == features.size(0) && m.size(1) == weight.size(0);
    TORCH_CHECK((shared || per_image) && m.size(-2) == features.size(2) && m.size(-1) == features.size(3), op,
                ": masks must be [C, h, w] or [B, C, h, w] = [", features.size(0), ", ", weight.size(0), ", ",
                features.size(2), ", ", features.size(3), "], got shape ", m.sizes());
    check_same(op, "masks", m, "features", features);
  }
}

inline void check_attention_cam_bias(const at::Tensor& bias, const at::Tensor& weight) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "attention_cam: bias must be [C] with C = ",
              weight.size(0), ", got shape ", bias.sizes());
  check_same("attention_cam", "bias", bias, "weight", weight);
}

// Boxes kept per map at most: the outputs are [..., max_boxes, 4] whatever the maps hold, so a huge value would only
// allocate memory for padding.
constexpr int64_t kMaxBoxes = 65536;
// The largest side of the image boxes are reported in (as dmfast.ops.OP_MAX_SIDE).
constexpr int64_t kMaxSide = 65536;

// cams [N, h, w] or [B, C, h, w] floats, size (H, W) >= 1, thresholds in [0, 1], max_boxes in [1, kMaxBoxes], score
// "max" or "mean".
inline void check_cam_boxes_args(const at::Tensor& cams, at::IntArrayRef size, at::ArrayRef<double> thresholds,
                                 int64_t max_boxes, c10::string_view score) {
  const char* op = "cam_boxes";
  TORCH_CHECK(cams.dim() == 3 || cams.dim() == 4, op, ": cams must be [N, h, w] or [B, C, h, w], got shape ",
              cams.sizes());
  TORCH_CHECK(cams.size(-1) > 0 && cams.size(-2) > 0, op, ": maps must have h, w > 0, got shape ", cams.sizes());
  check_float_dtype(op, "cams", cams);
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0 && size[0] <= kMaxSide && size[1] <= kMaxSide, op,
              ": size must be (H, W) with H, W in [1, ", kMaxSide, "], got ", size);
  TORCH_CHECK(!thresholds.empty(), op, ": give at least one threshold");
  for (const double t : thresholds) {
    TORCH_CHECK(t >= 0.0 && t <= 1.0, op, ": thresholds are fractions of the normalised range, in [0, 1]; got ", t);
  }
  TORCH_CHECK(max_boxes >= 1 && max_boxes <= kMaxBoxes, op, ": max_boxes must be in [1, ", kMaxBoxes, "], got ",
              max_boxes);
  TORCH_CHECK(score == "max" || score == "mean", op, ": score must be \"max\" or \"mean\", got \"", score, "\"");
}

}  // namespace dmfast
