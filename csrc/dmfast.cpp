// Every dmfast op schema lives here, with the typed C++ entry points of dmfast.h; device kernels register their
// implementations in their own files.
#include "dmfast.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(dmfast, m) {
  // Bilinear affine warp (affine_grid + grid_sample, align_corners=False, zero padding), then pool x pool average
  // pooling and bilinear restore to the input size; pool == 1 is the plain warp.
  m.def("affine_smooth(Tensor images, Tensor theta, int pool) -> Tensor");
  // output_mask = (images needs grad, theta needs grad); a gradient not asked for comes back as an empty tensor.
  m.def(
      "affine_smooth_backward(Tensor grad_output, Tensor images, Tensor theta, int pool, bool[2] output_mask)"
      " -> (Tensor, Tensor)");

  // The paper's Eq. 4, f' = psi * f + f = (1 + masks) * features, masks broadcast over batch and/or channels.
  m.def("mask_attention(Tensor features, Tensor masks) -> Tensor");
  m.def(
      "mask_attention_backward(Tensor grad_output, Tensor features, Tensor masks, bool[2] output_mask)"
      " -> (Tensor, Tensor)");
  // Class-specific attention CAM head (Eq. 5): plain_cams = weight . features over channels (BLAS), cams =
  // (1 + masks) * plain_cams, logits = spatial mean of cams + bias. plain_cams is returned for the backward,
  // whose missing (None) output gradients count as zero and select cheaper paths.
  m.def(
      "attention_cam(Tensor features, Tensor weight, Tensor bias, Tensor? masks)"
      " -> (Tensor logits, Tensor cams, Tensor plain_cams)");
  m.def(
      "attention_cam_backward(Tensor? grad_logits, Tensor? grad_cams, Tensor? grad_plain_cams, Tensor features,"
      " Tensor weight, Tensor plain_cams, Tensor? masks, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // CAMs -> boxes (Wang et al., CVPR 2017): per map, min-max normalise, bilinearly upsample to size (on the fly),
  // threshold at each level, label 8-connected components and box them. cams is [N, h, w]; returns boxes
  // [N, max_boxes, 4] (x0, y0, x1, y1; int64, padded with 0), scores [N, max_boxes] (float64, padded with 0),
  // counts [N] (all components found, also beyond max_boxes). score is "max" or "mean".
  m.def(
      "cam_boxes(Tensor cams, int[2] size, float[] thresholds, int max_boxes, str score)"
      " -> (Tensor boxes, Tensor scores, Tensor counts)");
}

namespace dmfast::ops {
namespace {

// The op's handle, looked up once; Signature is the C++ function type of its schema.
template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor affine_smooth(const at::Tensor& images, const at::Tensor& theta, int64_t pool) {
  static const auto op = handle<decltype(affine_smooth)>("dmfast::affine_smooth");
  return op.call(images, theta, pool);
}

std::tuple<at::Tensor, at::Tensor> affine_smooth_backward(const at::Tensor& grad_output, const at::Tensor& images,
                                                          const at::Tensor& theta, int64_t pool,
                                                          std::array<bool, 2> output_mask) {
  static const auto op = handle<decltype(affine_smooth_backward)>("dmfast::affine_smooth_backward");
  return op.call(grad_output, images, theta, pool, output_mask);
}

at::Tensor mask_attention(const at::Tensor& features, const at::Tensor& masks) {
  static const auto op = handle<decltype(mask_attention)>("dmfast::mask_attention");
  return op.call(features, masks);
}

std::tuple<at::Tensor, at::Tensor> mask_attention_backward(const at::Tensor& grad_output, const at::Tensor& features,
                                                           const at::Tensor& masks, std::array<bool, 2> output_mask) {
  static const auto op = handle<decltype(mask_attention_backward)>("dmfast::mask_attention_backward");
  return op.call(grad_output, features, masks, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cam(const at::Tensor& features, const at::Tensor& weight,
                                                             const at::Tensor& bias,
                                                             const std::optional<at::Tensor>& masks) {
  static const auto op = handle<decltype(attention_cam)>("dmfast::attention_cam");
  return op.call(features, weight, bias, masks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cam_backward(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_cams,
    const std::optional<at::Tensor>& grad_plain_cams, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& plain_cams, const std::optional<at::Tensor>& masks, std::array<bool, 4> output_mask) {
  static const auto op = handle<decltype(attention_cam_backward)>("dmfast::attention_cam_backward");
  return op.call(grad_logits, grad_cams, grad_plain_cams, features, weight, plain_cams, masks, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_boxes(const at::Tensor& cams, c10::IntArrayRef size,
                                                         c10::ArrayRef<double> thresholds, int64_t max_boxes,
                                                         c10::string_view score) {
  static const auto op = handle<decltype(cam_boxes)>("dmfast::cam_boxes");
  return op.call(cams, size, thresholds, max_boxes, score);
}

}  // namespace dmfast::ops
