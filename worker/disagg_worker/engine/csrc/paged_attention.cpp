// Paged decode attention for CPU: one query token per sequence against its KV blocks, read in place.
//
// The torch fallback gathers every sequence's blocks into a padded copy before SDPA; this kernel
// reads each block once where it lies in the pool. Two passes per sequence (scores + softmax, then the
// weighted sum of V), all heads of a sequence on one thread, sequences spread over threads.
// Built on first use by disagg_worker.engine.cpu_kernels (torch.utils.cpp_extension, cached).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include <type_traits>

template <typename T>
static inline float to_f(T x) { return static_cast<float>(x); }

template <typename scalar_t>
void decode_kernel(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, const int64_t* tables,
                   const int64_t* ctx, scalar_t* out, int64_t B, int64_t nh, int64_t kvh, int64_t hd,
                   int64_t bs, int64_t maxb, float scale, int64_t window) {
  const int64_t G = nh / kvh;
  const int64_t row = kvh * hd;  // floats per token in a block
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(nh * hd), acc(nh * hd), scores, kf(row), mx(nh), sum(nh);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = ctx[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t len = n - first;
      for (int64_t i = 0; i < nh * hd; ++i) qf[i] = to_f(q[b * nh * hd + i]) * scale;
      scores.resize(nh * len);
      std::fill(mx.begin(), mx.end(), -3.0e38f);
      for (int64_t t = first; t < n; ++t) {
        const scalar_t* kp = kc + (tables[b * maxb + t / bs] * bs + t % bs) * row;
        const float* kq;
        if constexpr (std::is_same_v<scalar_t, float>) { kq = kp; } else {
          for (int64_t i = 0; i < row; ++i) kf[i] = to_f(kp[i]);
          kq = kf.data();
        }
        for (int64_t hq = 0; hq < nh; ++hq) {
          const float* qp = &qf[hq * hd];
          const float* kh = kq + (hq / G) * hd;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < hd; ++d) s += qp[d] * kh[d];
          scores[hq * len + (t - first)] = s;
          if (s > mx[hq]) mx[hq] = s;
        }
      }
      for (int64_t hq = 0; hq < nh; ++hq) {
        float* sp = &scores[hq * len];
        float m = mx[hq], z = 0.f;
        
#pragma omp simd reduction(+ : z)
        for (int64_t t = 0; t < len; ++t) { sp[t] = std::exp(sp[t] - m); z += sp[t]; }
        sum[hq] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < n; ++t) {
        const scalar_t* vp = vc + (tables[b * maxb + t / bs] * bs + t % bs) * row;
        const float* vq;
        if constexpr (std::is_same_v<scalar_t, float>) { vq = vp; } else {
          for (int64_t i = 0; i < row; ++i) kf[i] = to_f(vp[i]);
          vq = kf.data();
        }
        for (int64_t hq = 0; hq < nh; ++hq) {
          const float w = scores[hq * len + (t - first)];
          const float* vh = vq + (hq / G) * hd;
          float* ap = &acc[hq * hd];
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) ap[d] += w * vh[d];
        }
      }
      for (int64_t hq = 0; hq < nh; ++hq)
        for (int64_t d = 0; d < hd; ++d)
          out[(b * nh + hq) * hd + d] = static_cast<scalar_t>(acc[hq * hd + d] / sum[hq]);
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, double scale,
                                     int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV pool must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the KV pool must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "head layout mismatch");
  auto qc = q.contiguous();
  auto out = torch::empty_like(qc);
  const int64_t B = qc.size(0), nh = qc.size(1), hd = qc.size(2);
  const int64_t bs = k_cache.size(1), kvh = k_cache.size(2);
  auto tables = block_tables.contiguous();
  auto ctx = ctx_lens.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int64_t>(), ctx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, nh,
                            kvh, hd, bs, tables.size(1), static_cast<float>(scale), window);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode_attention", &paged_decode_attention); }
