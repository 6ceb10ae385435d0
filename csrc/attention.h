// Shared math of the mask-attention ops (mask_attention, attention_cam), compiled by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common.h"

namespace dmfast {

// Plane of a mask broadcast over [B or 1, K or 1] that feature plane (b, k) reads.
DMFAST_HD int64_t mask_plane(int64_t b, int64_t k, int64_t mask_batch, int64_t mask_channels) {
  return (mask_batch == 1 ? 0 : b) * mask_channels + (mask_channels == 1 ? 0 : k);
}

// Eq. 4 / Eq. 5 scaling: attended = (1 + psi) * value.
template <typename T>
DMFAST_HD T attend(T value, T psi) {
  return value + psi * value;
}

// Backward of one attention_cam element. total = d cams + d logits / (h w) is the gradient reaching cams;
// returns d plain_cams and sets the element's contribution to d masks.
template <typename T>
DMFAST_HD T attention_cam_grad(T grad_cam, T grad_logit_per_pixel, T grad_plain, T plain, T psi, T* grad_psi) {
  const T total = grad_cam + grad_logit_per_pixel;
  *grad_psi = total * plain;
  return attend(total, psi) + grad_plain;
}

}  // namespace dmfast
