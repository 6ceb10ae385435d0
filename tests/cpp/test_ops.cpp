// C++-level test: the ops are reachable through the public header dmfast.h from plain libtorch code and match
// ATen's eager chain on seeded random inputs. Exits non-zero on the first mismatch.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "dmfast.h"

namespace {

at::Tensor reference(const at::Tensor& images, const at::Tensor& theta, int64_t pool) {
  const auto grid = at::affine_grid_generator(theta, images.sizes(), /*align_corners=*/false);
  const auto warped = at::grid_sampler_2d(images, grid, /*interpolation=*/0, /*padding=*/0, /*align_corners=*/false);
  if (pool == 1) return warped;
  const auto pooled = at::avg_pool2d(warped, {pool, pool});
  return at::upsample_bilinear2d(pooled, {images.size(2), images.size(3)}, /*align_corners=*/false);
}

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, const char* what) {
  const double err = (got - want).abs().max().item<double>();
  std::printf("%-40s max abs error %.3g\n", what, err);
  if (!(err < 1e-10)) ++failures;
}

}  // namespace

int main() {
  namespace ops = dmfast::ops;
  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  for (int64_t pool : {1, 2, 4, 16}) {
    const auto images = at::rand({2, 3, 32, 48}, options);
    const auto theta = at::eye(3, options).narrow(0, 0, 2).expand({2, 2, 3}) + 0.3 * (at::rand({2, 2, 3}, options) - 0.5);
    char what[64];
    std::snprintf(what, sizeof what, "forward, pool %lld", static_cast<long long>(pool));
    expect_close(ops::affine_smooth(images, theta, pool), reference(images, theta, pool), what);

    // Backward against the gradient of the reference's linearisation: <grad, out> differentiated by autograd.
    const auto grad = at::randn(images.sizes(), options);
    const auto images_var = images.clone().set_requires_grad(true);
    const auto theta_var = theta.clone().set_requires_grad(true);
    const auto loss = (reference(images_var, theta_var, pool) * grad).sum();
    loss.backward();
    const auto [grad_images, grad_theta] = ops::affine_smooth_backward(grad, images, theta, pool, {true, true});
    std::snprintf(what, sizeof what, "backward images, pool %lld", static_cast<long long>(pool));
    expect_close(grad_images, images_var.grad(), what);
    std::snprintf(what, sizeof what, "backward theta, pool %lld", static_cast<long long>(pool));
    expect_close(grad_theta, theta_var.grad(), what);
  }
  {
    const auto features = at::randn({2, 5, 4, 6}, options), masks = at::rand({1, 5, 4, 6}, options);
    expect_close(ops::mask_attention(features, masks), features * (1 + masks), "mask_attention");

    const auto weight = at::randn({3, 5}, options), bias = at::randn({3}, options);
    const auto class_masks = at::rand({3, 4, 6}, options);
    const auto [logits, cams, plain] = ops::attention_cam(features, weight, bias, class_masks);
    const auto expected_plain = at::einsum("ck,bkhw->bchw", {weight, features});
    expect_close(plain, expected_plain, "attention_cam plain maps");
    expect_close(cams, expected_plain * (1 + class_masks), "attention_cam attended maps");
    expect_close(logits, cams.mean({2, 3}) + bias, "attention_cam logits");
  }
  {
    // A non-finite theta poisons its own image only; a map with NaN gets count -1 (no host synchronisation).
    const auto images = at::rand({2, 1, 16, 16}, options);
    auto theta = at::eye(3, options).narrow(0, 0, 2).expand({2, 2, 3}).clone();
    theta[1][0][2] = std::numeric_limits<double>::quiet_NaN();
    const auto out = ops::affine_smooth(images, theta, 4);
    const bool poisoned = out[1].isnan().all().item<bool>() && out[0].isfinite().all().item<bool>();
    std::printf("%-40s %s\n", "non-finite theta gives NaN for its image", poisoned ? "yes" : "NO");
    if (!poisoned) ++failures;
    auto maps = at::rand({2, 4, 4}, options);
    maps[0][1][1] = std::numeric_limits<double>::infinity();
    const auto counts = std::get<2>(ops::cam_boxes(maps, {16, 16}, {0.5}, 2, "max"));
    const bool flagged = counts[0].item<int64_t>() == -1 && counts[1].item<int64_t>() >= 1;
    std::printf("%-40s %s\n", "non-finite map counted -1", flagged ? "yes" : "NO");
    if (!flagged) ++failures;
  }
  bool rejected = false;
  try {
    ops::affine_smooth(at::rand({1, 1, 30, 30}, options), at::eye(3, options).narrow(0, 0, 2).unsqueeze(0), 16);
  } catch (const c10::Error& e) {
    rejected = std::string(e.what()).find("divisible by pool=16") != std::string::npos;
  }
  std::printf("%-40s %s\n", "bad pool rejected with a clear error", rejected ? "yes" : "NO");
  if (!rejected) ++failures;
  std::printf("%s\n", failures == 0 ? "all C++ checks passed" : "C++ checks FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
