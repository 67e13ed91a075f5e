// Fused element-wise ops of a decoder layer for CPU: RMSNorm (optionally after the residual add),
// rotary position embedding, and SiLU-gated multiply. Each replaces a chain of 4-14 small torch ops
// whose per-op dispatch cost dominates a decode step of a small model, and whose separate passes
// over the activations dominate a prefill step's non-GEMM time. The arithmetic follows the
// transformers modules they stand in for (fp32 compute, same formulas).
#include "kernels.h"
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>

namespace {

constexpr int64_t kRowsPerTask = 16;

template <typename scalar_t>
void rms_rows(const scalar_t* x, const scalar_t* w, scalar_t* out, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * hidden;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < hidden; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
      scalar_t* o = out + r * hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i)
        o[i] = static_cast<scalar_t>(static_cast<float>(w[i]) *
                                     static_cast<float>(static_cast<scalar_t>(static_cast<float>(xr[i]) * inv)));
    }
  });
}

template <typename scalar_t>
void rotary_rows(const scalar_t* xp, const scalar_t* cp, const scalar_t* sp, scalar_t* op, int64_t T, int64_t H,
                 int64_t D, int64_t st, int64_t sh) {
  const int64_t half = D / 2;
  at::parallel_for(0, T, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* c = cp + t * D;
      const scalar_t* s = sp + t * D;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* xi = xp + t * st + h * sh;
        scalar_t* o = op + (t * H + h) * D;
        // torch's roundings: x*cos and rotate_half(x)*sin each rounded to scalar_t, then the sum
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float lo = static_cast<float>(static_cast<scalar_t>(static_cast<float>(xi[d]) * static_cast<float>(c[d])));
          const float rl = static_cast<float>(
              static_cast<scalar_t>(-static_cast<float>(xi[d + half]) * static_cast<float>(s[d])));
          const float hi = static_cast<float>(
              static_cast<scalar_t>(static_cast<float>(xi[d + half]) * static_cast<float>(c[d + half])));
          const float rh = static_cast<float>(
              static_cast<scalar_t>(static_cast<float>(xi[d]) * static_cast<float>(s[d + half])));
          o[d] = static_cast<scalar_t>(lo + rl);
          o[d + half] = static_cast<scalar_t>(hi + rh);
        }
      }
    }
  });
}

template <typename scalar_t>
void silu_mul_rows(const scalar_t* g, scalar_t* o, int64_t T, int64_t I) {
  at::parallel_for(0, T, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* gr = g + t * 2 * I;
      const scalar_t* ur = gr + I;
      scalar_t* orow = o + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float x = static_cast<float>(gr[i]);
        const float act = static_cast<float>(static_cast<scalar_t>(x / (1.f + std::exp(-x))));
        orow[i] = static_cast<scalar_t>(act * static_cast<float>(ur[i]));
      }
    }
  });
}

}  // namespace

// weight * (x * rsqrt(mean(x^2) + eps)), rows of the last dimension.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: x [..., H] and weight [H] of one dtype");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t hidden = weight.size(0), rows = xc.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), weight.contiguous().data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       rows, hidden, static_cast<float>(eps));
  });
  return out;
}

// residual += x (in place), then rms_norm(residual): the residual stream and the next block's input.
torch::Tensor add_rms_norm_(torch::Tensor residual, torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes(), "add_rms_norm_: contiguous residual");
  residual.add_(x);
  return rms_norm(residual, weight, eps);
}

// x * cos + rotate_half(x) * sin for x [T, heads, D] (any token/head strides, unit stride in D) and
// cos/sin [T, D]; returns a contiguous [T, heads, D].
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary: x [T, heads, D] with unit stride in D");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && sin.sizes() == cos.sizes(),
              "rotary: cos/sin [T, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rotary: one dtype");
  auto out = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  auto cc = cos.contiguous(), sc = sin.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    rotary_rows<scalar_t>(x.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                          out.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1));
  });
  return out;
}

// silu(gate) * up for gate_up [T, 2I] laid out as [gate | up]; returns [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(), "silu_mul: [T, 2I]");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.size(0),
                            gate_up.size(1) / 2);
  });
  return out;
}
