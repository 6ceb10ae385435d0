// Every dmfast op schema lives here; device kernels register their implementations in their own files.
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
