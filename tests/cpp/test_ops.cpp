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
  {
    // Adversarial inputs, for `make sanitize` above all: theta at, beyond and far beyond the domain (|theta| <=
    // 1e6), in float32 and float64, on odd-sized images; nothing may read or write out of bounds, an image outside
    // the domain is all NaN and the others stay finite.
    const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
    bool defined = true;
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      for (const double v : {1e6, -1e6, 1.5e6, 1e10, 1e30, 1e38, 3e38, -1e38, -3e38, inf, -inf, nan}) {
        for (const auto& [pool, column] : {std::pair<int64_t, bool>{1, true}, {1, false}, {2, true}, {4, false}}) {
          const auto images = at::rand({2, 1 + int64_t(column), 16, 16}, at::TensorOptions().dtype(dtype));
          auto theta = at::eye(3, images.options()).narrow(0, 0, 2).expand({2, 2, 3}).clone();
          theta[1][0][0] = v;  // column: theta [[v, 0, 0], [v, 0, 0]] (the case that once crashed), else a shear
          theta[1][1][column ? 0 : 1] = v;
          if (!column) theta[1][0][2] = v;
          const auto out = ops::affine_smooth(images, theta, pool);
          const auto grads = ops::affine_smooth_backward(at::ones_like(images), images, theta, pool, {true, true});
          const bool inside = std::abs(v) <= 1e6;
          defined = defined && out[0].isfinite().all().item<bool>() &&
                    (inside ? out[1].isfinite().all().item<bool>() : out[1].isnan().all().item<bool>()) &&
                    std::get<1>(grads)[0].isfinite().all().item<bool>();
        }
      }
    }
    std::printf("%-40s %s\n", "theta beyond the domain gives NaN", defined ? "yes" : "NO");
    if (!defined) ++failures;

    // Degenerate maps and sizes: 1 x 1 maps, 1-pixel outputs, constant maps, a checkerboard of many regions.
    bool boxed = true;
    const auto checker = (at::arange(64, options).reshape({8, 8}) + at::arange(8, options).reshape({8, 1})).remainder(2);
    for (const auto& maps : {at::rand({3, 1, 1}, options), at::zeros({2, 5, 7}, options), checker.unsqueeze(0)}) {
      for (const std::vector<int64_t> size : {std::vector<int64_t>{1, 1}, {1, 97}, {33, 2}, {64, 64}}) {
        for (const int64_t max_boxes : {1, 3, 65536}) {
          const auto [boxes, scores, counts] = ops::cam_boxes(maps, size, {0.0, 0.5, 1.0}, max_boxes, "mean");
          boxed = boxed && boxes.size(1) == max_boxes && (boxes.select(2, 2) <= size[1]).all().item<bool>() &&
                  (boxes.select(2, 3) <= size[0]).all().item<bool>() && (counts >= 0).all().item<bool>();
        }
      }
    }
    std::printf("%-40s %s\n", "degenerate maps give boxes in the image", boxed ? "yes" : "NO");
    if (!boxed) ++failures;
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
