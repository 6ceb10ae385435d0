// C++-level test: the ops are reachable through the dispatcher from plain libtorch code and match ATen's
// eager chain on random inputs. Exits non-zero on the first mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

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
  const auto forward = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("dmfast::affine_smooth", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  const auto backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dmfast::affine_smooth_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                    std::array<bool, 2>)>();
  at::manual_seed(std::random_device{}());
  const auto options = at::TensorOptions().dtype(at::kDouble);
  for (int64_t pool : {1, 2, 4, 16}) {
    const auto images = at::rand({2, 3, 32, 48}, options);
    const auto theta = at::eye(3, options).narrow(0, 0, 2).expand({2, 2, 3}) + 0.3 * (at::rand({2, 2, 3}, options) - 0.5);
    char what[64];
    std::snprintf(what, sizeof what, "forward, pool %lld", static_cast<long long>(pool));
    expect_close(forward.call(images, theta, pool), reference(images, theta, pool), what);

    // Backward against the gradient of the reference's linearisation: <grad, out> differentiated by autograd.
    const auto grad = at::randn(images.sizes(), options);
    const auto images_var = images.clone().set_requires_grad(true);
    const auto theta_var = theta.clone().set_requires_grad(true);
    const auto loss = (reference(images_var, theta_var, pool) * grad).sum();
    loss.backward();
    const auto [grad_images, grad_theta] = backward.call(grad, images, theta, pool, {true, true});
    std::snprintf(what, sizeof what, "backward images, pool %lld", static_cast<long long>(pool));
    expect_close(grad_images, images_var.grad(), what);
    std::snprintf(what, sizeof what, "backward theta, pool %lld", static_cast<long long>(pool));
    expect_close(grad_theta, theta_var.grad(), what);
  }
  {
    const auto mask_attention = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("dmfast::mask_attention", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    const auto features = at::randn({2, 5, 4, 6}, options), masks = at::rand({1, 5, 4, 6}, options);
    expect_close(mask_attention.call(features, masks), features * (1 + masks), "mask_attention");

    const auto attention_cam =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("dmfast::attention_cam", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const std::optional<at::Tensor>&)>();
    const auto weight = at::randn({3, 5}, options), bias = at::randn({3}, options);
    const auto class_masks = at::rand({3, 4, 6}, options);
    const auto [logits, cams, plain] = attention_cam.call(features, weight, bias, class_masks);
    const auto expected_plain = at::einsum("ck,bkhw->bchw", {weight, features});
    expect_close(plain, expected_plain, "attention_cam plain maps");
    expect_close(cams, expected_plain * (1 + class_masks), "attention_cam attended maps");
    expect_close(logits, cams.mean({2, 3}) + bias, "attention_cam logits");
  }
  bool rejected = false;
  try {
    forward.call(at::rand({1, 1, 30, 30}, options), at::eye(3, options).narrow(0, 0, 2).unsqueeze(0), 16);
  } catch (const c10::Error& e) {
    rejected = std::string(e.what()).find("divisible by pool=16") != std::string::npos;
  }
  std::printf("%-40s %s\n", "bad pool rejected with a clear error", rejected ? "yes" : "NO");
  if (!rejected) ++failures;
  std::printf("%s\n", failures == 0 ? "all C++ checks passed" : "C++ checks FAILED");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
