// CUDA kernels of dmfast::affine_smooth and its backward. Same math as the CPU kernels (affine_smooth.h):
// pooled cells straight from the affine map, then the bilinear restore; no sampling grid, no full-resolution warp.
// The image gradient uses atomic adds (like grid_sample's); the theta gradient is reduced in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../affine_smooth.h"
#include "../checks.h"
#include "launch.cuh"

namespace dmfast {
namespace {

template <typename T>
__device__ __forceinline__ Corners<T> sample_corners(const PixelMap<T>& map, int64_t i, int64_t j, int64_t H,
                                                     int64_t W) {
  return corners_of(clamp_far(map.x(i, j), W), clamp_far(map.y(i, j), H));
}

// One (image, channel, cell) per group of `lanes` threads (1, or a whole warp for large pools); the lanes stride
// over the cell's samples and reduce with shuffles.
template <typename scalar_t, typename T>
__global__ void pooled_warp_kernel(const scalar_t* __restrict__ images, const double* __restrict__ theta, int64_t B,
                                   int64_t C, int64_t H, int64_t W, int64_t pool, int lanes,
                                   scalar_t* __restrict__ pooled) {
  const int64_t Hp = H / pool, Wp = W / pool;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t cell = thread / lanes;
  const int lane = int(thread % lanes);
  const bool active = cell < B * C * Hp * Wp;
  T acc = 0;
  if (active) {
    const int64_t q = cell % Wp, r = (cell / Wp) % Hp, plane = cell / (Wp * Hp), b = plane / C;
    const PixelMap<T> map = make_pixel_map<T>(theta + 6 * b, H, W);
    const scalar_t* img = images + plane * H * W;
    if (!theta_in_domain(theta + 6 * b)) {
      acc = std::numeric_limits<T>::quiet_NaN();
    } else {
      for (int64_t k = lane; k < pool * pool; k += lanes) {
        const int64_t i = r * pool + k / pool, j = q * pool + k % pool;
        const Corners<T> c = sample_corners(map, i, j, H, W);
        T v[4];
        corner_values(img, c, H, W, v);
        acc += (T(1) - c.fy) * ((T(1) - c.fx) * v[0] + c.fx * v[1]) + c.fy * ((T(1) - c.fx) * v[2] + c.fx * v[3]);
      }
    }
  }
  if (lanes == kWarp) acc = warp_sum(acc);  // lanes == 32 groups are whole, aligned warps
  if (active && lane == 0) pooled[cell] = scalar_t(acc / T(pool * pool));
}

template <typename scalar_t, typename T>
__global__ void restore_kernel(const scalar_t* __restrict__ pooled, int64_t planes, int64_t Hp, int64_t Wp, int64_t H,
                               int64_t W, scalar_t* __restrict__ out) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= planes * H * W) return;
  const int64_t x = index % W, y = (index / W) % H, plane = index / (W * H);
  const auto tx = upsample_tap<T>(x, Wp, W);
  const auto ty = upsample_tap<T>(y, Hp, H);
  const scalar_t* p = pooled + plane * Hp * Wp;
  const T top = tx.lambda0 * T(p[ty.i0 * Wp + tx.i0]) + tx.lambda1 * T(p[ty.i0 * Wp + tx.i1]);
  const T bottom = tx.lambda0 * T(p[ty.i1 * Wp + tx.i0]) + tx.lambda1 * T(p[ty.i1 * Wp + tx.i1]);
  out[index] = scalar_t(ty.lambda0 * top + ty.lambda1 * bottom);
}

// Weight of pooled index r in the restore tap of output index d.
template <typename T>
__device__ __forceinline__ T tap_weight(int64_t d, int64_t r, int64_t in_size, T scale) {
  const auto t = linear_tap<T>(d, in_size, scale);
  return (t.i0 == r ? t.lambda0 : T(0)) + (t.i1 == r ? t.lambda1 : T(0));
}

// grad of each sample of cell (plane, r, q): the transposed restore gathered over the outputs that read the cell,
// divided by pool^2. One thread per cell; no atomics.
template <typename scalar_t, typename T>
__global__ void restore_transposed_kernel(const scalar_t* __restrict__ grad, int64_t planes, int64_t Hp, int64_t Wp,
                                          int64_t H, int64_t W, int64_t pool, T* __restrict__ cells) {
  const int64_t cell = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cell >= planes * Hp * Wp) return;
  const int64_t q = cell % Wp, r = (cell / Wp) % Hp, plane = cell / (Wp * Hp);
  int64_t y_lo, y_hi, x_lo, x_hi;
  restore_source_range(r, pool, H, &y_lo, &y_hi);
  restore_source_range(q, pool, W, &x_lo, &x_hi);
  const scalar_t* g = grad + plane * H * W;
  const T sy = T(Hp) / T(H), sx = T(Wp) / T(W);
  T acc = 0;
  for (int64_t y = y_lo; y < y_hi; ++y) {
    const T wy = tap_weight(y, r, Hp, sy);
    if (wy == T(0)) continue;
    T row = 0;
    for (int64_t x = x_lo; x < x_hi; ++x) row += tap_weight(x, q, Wp, sx) * T(g[y * W + x]);
    acc += wy * row;
  }
  cells[cell] = acc / T(pool * pool);
}

// One thread per sample point (b, i, j) across all channels: scatters the image gradient with atomics and
// block-reduces the six theta moments into partial[b, block, 6].
template <typename scalar_t, typename T>
__global__ void sample_backward_kernel(const scalar_t* __restrict__ images, const double* __restrict__ theta,
                                       const T* __restrict__ cells, int64_t C, int64_t H, int64_t W, int64_t pool,
                                       bool need_images, bool need_theta, T* __restrict__ grad_images,
                                       T* __restrict__ partial) {
  __shared__ T shared[6][kThreads];
  const int64_t b = blockIdx.y;
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t Hp = H / pool, Wp = W / pool, HW = H * W;
  T m[6] = {0, 0, 0, 0, 0, 0};
  if (k < HW && !theta_in_domain(theta + 6 * b)) {
    // Each thread owns pixel k of every channel here: no atomics touch this image.
    for (int64_t ch = 0; need_images && ch < C; ++ch) {
      grad_images[(b * C + ch) * HW + k] = std::numeric_limits<T>::quiet_NaN();
    }
  } else if (k < HW) {
    const int64_t i = k / W, j = k % W, r = i / pool, q = j / pool;
    const PixelMap<T> map = make_pixel_map<T>(theta + 6 * b, H, W);
    const Corners<T> c = sample_corners(map, i, j, H, W);
    const T w[4] = {(T(1) - c.fx) * (T(1) - c.fy), c.fx * (T(1) - c.fy), (T(1) - c.fx) * c.fy, c.fx * c.fy};
    T weighted[4] = {0, 0, 0, 0};
    for (int64_t ch = 0; ch < C; ++ch) {
      const int64_t plane = b * C + ch;
      const T g = cells[(plane * Hp + r) * Wp + q];
      if (need_images) {
        T* gi = grad_images + plane * HW;
        for (int e = 0; e < 4; ++e) {
          const int64_t x = c.x0 + (e & 1), y = c.y0 + (e >> 1);
          if (x >= 0 && x < W && y >= 0 && y < H) atomicAdd(gi + y * W + x, g * w[e]);
        }
      }
      if (need_theta) {
        T v[4];
        corner_values(images + plane * HW, c, H, W, v);
        for (int e = 0; e < 4; ++e) weighted[e] += g * v[e];
      }
    }
    T gx, gy;
    corner_gradient(weighted, c, &gx, &gy);
    m[0] = gx, m[1] = gx * T(j), m[2] = gx * T(i), m[3] = gy, m[4] = gy * T(j), m[5] = gy * T(i);
  }
  if (!need_theta) return;
  for (int e = 0; e < 6; ++e) shared[e][threadIdx.x] = m[e];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int e = 0; e < 6; ++e) shared[e][threadIdx.x] += shared[e][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int e = 0; e < 6; ++e) partial[(b * gridDim.x + blockIdx.x) * 6 + e] = shared[e][0];
  }
}

// Sums each image's block partials in a fixed order (deterministic) and turns the moments into d theta.
template <typename T>
__global__ void theta_grad_kernel(const T* __restrict__ partial, const double* __restrict__ theta, int64_t B,
                                  int64_t blocks, int64_t H, int64_t W, double* __restrict__ grad_theta) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  if (!theta_in_domain(theta + 6 * b)) {
    for (int e = 0; e < 6; ++e) grad_theta[6 * b + e] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  double total[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < blocks; ++k) {
    for (int e = 0; e < 6; ++e) total[e] += double(partial[(b * blocks + k) * 6 + e]);
  }
  theta_grad_from_moments(total, H, W, grad_theta + 6 * b);
}

at::Tensor affine_smooth_cuda(const at::Tensor& images_in, const at::Tensor& theta, int64_t pool) {
  check_affine_smooth_args(images_in, theta, pool, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(images_in.device());
  const at::Tensor images = images_in.contiguous();
  const at::Tensor theta_d = theta.to(at::kDouble).contiguous();
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t Hp = H / pool, Wp = W / pool;
  at::Tensor out = at::empty_like(images, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "affine_smooth_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor pooled = pool == 1 ? out : at::empty({B, C, Hp, Wp}, images.options());
    const int lanes = pool * pool >= 64 ? kWarp : 1;
    pooled_warp_kernel<scalar_t, T><<<blocks_for(pooled.numel() * lanes), kThreads, 0, stream>>>(
        images.const_data_ptr<scalar_t>(), theta_d.const_data_ptr<double>(), B, C, H, W, pool, lanes,
        pooled.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (pool > 1) {
      restore_kernel<scalar_t, T><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          pooled.const_data_ptr<scalar_t>(), B * C, Hp, Wp, H, W, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_smooth_backward_cuda(const at::Tensor& grad_output,
                                                               const at::Tensor& images_in, const at::Tensor& theta,
                                                               int64_t pool, std::array<bool, 2> output_mask) {
  check_affine_smooth_args(images_in, theta, pool, c10::DeviceType::CUDA);
  check_affine_smooth_grad(grad_output, images_in);
  const c10::cuda::CUDAGuard guard(images_in.device());
  const at::Tensor images = images_in.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor theta_d = theta.to(at::kDouble).contiguous();
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t Hp = H / pool, Wp = W / pool;
  const bool need_images = output_mask[0], need_theta = output_mask[1];
  TORCH_CHECK(B <= 65535, "affine_smooth_backward: the CUDA kernel takes at most 65535 images per call, got ", B);
  at::Tensor grad_images = at::empty({0}, images.options());
  at::Tensor grad_theta = at::empty({0}, theta.options());
  if ((!need_images && !need_theta) || images.numel() == 0) {
    if (need_images) grad_images = at::zeros(images.sizes(), images.options());
    if (need_theta) grad_theta = at::zeros(theta.sizes(), theta.options());
    return {grad_images, grad_theta};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "affine_smooth_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto opmath = images.options().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor cells = at::empty({B, C, Hp, Wp}, opmath);
    restore_transposed_kernel<scalar_t, T><<<blocks_for(cells.numel()), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), B * C, Hp, Wp, H, W, pool, cells.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t blocks = blocks_for(H * W);
    at::Tensor grad_acc = need_images ? at::zeros(images.sizes(), opmath) : at::empty({0}, opmath);
    at::Tensor partial = at::empty({need_theta ? B * blocks * 6 : 0}, opmath);
    sample_backward_kernel<scalar_t, T><<<dim3(blocks, B), kThreads, 0, stream>>>(
        images.const_data_ptr<scalar_t>(), theta_d.const_data_ptr<double>(), cells.const_data_ptr<T>(), C, H, W,
        pool, need_images, need_theta, need_images ? grad_acc.mutable_data_ptr<T>() : nullptr,
        need_theta ? partial.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_images) grad_images = grad_acc.to(images.scalar_type());
    if (need_theta) {
      at::Tensor grad_d = at::empty({B, 6}, images.options().dtype(at::kDouble));
      theta_grad_kernel<T><<<blocks_for(B), kThreads, 0, stream>>>(
          partial.const_data_ptr<T>(), theta_d.const_data_ptr<double>(), B, blocks, H, W,
          grad_d.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_theta = grad_d.view({B, 2, 3}).to(theta.scalar_type());
    }
  });
  return {grad_images, grad_theta};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmfast, CUDA, m) {
  m.impl("affine_smooth", &affine_smooth_cuda);
  m.impl("affine_smooth_backward", &affine_smooth_backward_cuda);
}

}  // namespace dmfast
