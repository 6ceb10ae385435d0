// dmfast's ops for C++ callers: typed functions that call the ops through the PyTorch dispatcher, so every device
// kernel linked in (CPU, and CUDA when built with it) is reached the same way as from Python.
//
// Link against the dmfast_ops library (CMakeLists.txt) or load the Python extension. These are the raw forward and
// backward ops: autograd is registered in Python (dmfast/ops.py), so from C++ there is no autograd graph through
// them; call the *_backward op with the output gradient yourself. Shapes, dtypes and semantics are documented in
// dmfast/ops.py and at each schema in dmfast.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace dmfast::ops {

// Warp by theta [B, 2, 3], pool x pool average pooling and bilinear restore (pool 1: the plain warp).
at::Tensor affine_smooth(const at::Tensor& images, const at::Tensor& theta, int64_t pool);
// (grad_images, grad_theta); output_mask says which are wanted (the others come back empty).
std::tuple<at::Tensor, at::Tensor> affine_smooth_backward(const at::Tensor& grad_output, const at::Tensor& images,
                                                          const at::Tensor& theta, int64_t pool,
                                                          std::array<bool, 2> output_mask);

// (1 + masks) * features, masks broadcast over the batch and/or channels.
at::Tensor mask_attention(const at::Tensor& features, const at::Tensor& masks);
std::tuple<at::Tensor, at::Tensor> mask_attention_backward(const at::Tensor& grad_output, const at::Tensor& features,
                                                           const at::Tensor& masks, std::array<bool, 2> output_mask);

// (logits [B, C], cams [B, C, h, w], plain_cams [B, C, h, w]) of the attention CAM head.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cam(const at::Tensor& features, const at::Tensor& weight,
                                                             const at::Tensor& bias,
                                                             const std::optional<at::Tensor>& masks);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cam_backward(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_cams,
    const std::optional<at::Tensor>& grad_plain_cams, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& plain_cams, const std::optional<at::Tensor>& masks, std::array<bool, 4> output_mask);

// (boxes [..., max_boxes, 4] int64, scores [..., max_boxes] float64, counts [...] int64; -1 for a map with NaN/inf).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_boxes(const at::Tensor& cams, c10::IntArrayRef size,
                                                         c10::ArrayRef<double> thresholds, int64_t max_boxes,
                                                         c10::string_view score);

}  // namespace dmfast::ops
