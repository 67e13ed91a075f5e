// Paged decode attention for CPU: one query token per sequence against its KV blocks, read in place.
//
// The torch fallback gathers every sequence's blocks into a padded copy before SDPA; this kernel
// reads each block once where it lies in the pool. A work item is one (sequence, kv head) pair, so
// the query heads that share a kv head (GQA) use each K/V row while it is in cache, and items spread
// over threads. One pass per item with an online softmax (running max and sum per query head): a
// block's K and V are read back to back. Head dims 32/64/128 are compile-time constants so the dot
// products and the V accumulation vectorise completely; other head dims take the generic path.
//
// On x86 with AVX2+FMA, the common shapes (head dim 32/64/128, 1/2/4/8 query heads per kv head) take
// a register-resident path: the item's scaled queries and output accumulators live in registers, and
// the dot products of 8 (token, query head) pairs are reduced together (one horizontal-add tree per 8
// scores instead of one per score), which makes the kernel memory-bound instead of shuffle-bound.
// Built on first use by disagg_worker.engine.cpu_kernels (torch.utils.cpp_extension, cached).
#include "kernels.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DISAGG_AVX2 1
#endif

// Below any real score; avoids infinities, which -ffast-math does not promise to handle.
static constexpr float kNoScore = -3.0e38f;

template <typename scalar_t>
static inline const float* as_float_row(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Blocks of one sequence lie anywhere in the pool, so the hardware prefetcher cannot run ahead of
// a block boundary; ask for the next block's rows of this kv head while the current one is used.
template <typename scalar_t>
static inline void prefetch_block(const scalar_t* kc, const scalar_t* vc, int64_t slot, int64_t bs, int64_t row,
                                  int64_t offset, int64_t hd) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t i = 0; i < bs; ++i) {
    const int64_t base = (slot + i) * row + offset;
    for (int64_t e = 0; e < hd; e += kLine) {
      __builtin_prefetch(kc + base + e);
      __builtin_prefetch(vc + base + e);
    }
  }
}

// One block's scores of one query head into its running softmax: ``p[0, nt)`` becomes exp(score -
// new max) in place, ``mx``/``sum`` move on, and the factor the accumulated output must be scaled
// by is returned (1 when the max did not change).
static inline float online_softmax_block(float* p, int64_t nt, float& mx, float& sum) {
  float m = mx;
  for (int64_t i = 0; i < nt; ++i) m = std::max(m, p[i]);
  const float rescale = std::exp(mx - m);
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < nt; ++i) { p[i] = std::exp(p[i] - m); z += p[i]; }
  sum = sum * rescale + z;
  mx = m;
  return rescale;
}

template <typename scalar_t, int HD>
void decode_kernel(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, const int64_t* tables,
                   const int64_t* ctx, scalar_t* out, int64_t B, int64_t nh, int64_t kvh, int64_t hd_runtime,
                   int64_t bs, int64_t maxb, float scale, int64_t window) {
  const int64_t hd = HD > 0 ? HD : hd_runtime;
  const int64_t G = nh / kvh;
  const int64_t row = kvh * hd;  // elements per token in a block
  at::parallel_for(0, B * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * hd), acc(G * hd), p(G * bs), mx(G), sum(G), buf(hd);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kvh, h = item % kvh;
      const int64_t n = ctx[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const scalar_t* qb = q + (b * nh + h * G) * hd;
      for (int64_t i = 0; i < G * hd; ++i) qf[i] = static_cast<float>(qb[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), kNoScore);
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t blk = first / bs; blk * bs < n; ++blk) {
        const int64_t t0 = std::max(blk * bs, first), nt = std::min((blk + 1) * bs, n) - t0;
        const int64_t slot0 = tables[b * maxb + blk] * bs + (t0 - blk * bs);
        if ((blk + 1) * bs < n) prefetch_block(kc, vc, tables[b * maxb + blk + 1] * bs, bs, row, h * hd, hd);
        for (int64_t i = 0; i < nt; ++i) {
          const float* kr = as_float_row(kc + (slot0 + i) * row + h * hd, hd, buf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = &qf[g * hd];
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < hd; ++d) s += qg[d] * kr[d];
            p[g * bs + i] = s;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const float rescale = online_softmax_block(&p[g * bs], nt, mx[g], sum[g]);
          if (rescale != 1.f) {
            float* ag = &acc[g * hd];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ag[d] *= rescale;
          }
        }
        for (int64_t i = 0; i < nt; ++i) {
          const float* vr = as_float_row(vc + (slot0 + i) * row + h * hd, hd, buf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float w = p[g * bs + i];
            float* ag = &acc[g * hd];
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) ag[d] += w * vr[d];
          }
        }
      }
      scalar_t* ob = out + (b * nh + h * G) * hd;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < hd; ++d) ob[g * hd + d] = static_cast<scalar_t>(acc[g * hd + d] * inv);
      }
    }
  });
}

#ifdef DISAGG_AVX2
static constexpr int64_t kMaxFastBlock = 64;  // larger blocks take the generic path

// 8 floats of a row as one vector, whatever the pool's dtype.
template <typename scalar_t>
static inline __m256 load8(const scalar_t* src) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(src);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {  // bf16 is the top half of an fp32
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  } else {  // at::Half (F16C comes with every AVX2 CPU)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

// Eight vectors of partial sums -> one vector holding their eight horizontal sums, in order.
static inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a = [s0 s1 s2 s3 | s0' s1' s2' s3']: each sum's low and high 128-bit halves; b likewise for s4..s7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// HD: head dim (a multiple of 8); G: query heads per kv head, a divisor of 8. T = 8 / G tokens are
// scored per hsum8, so every reduction tree is full.
template <typename scalar_t, int HD, int G>
void decode_kernel_avx2(const scalar_t* q, const scalar_t* kc, const scalar_t* vc, const int64_t* tables,
                        const int64_t* ctx, scalar_t* out, int64_t B, int64_t nh, int64_t kvh, int64_t bs,
                        int64_t maxb, float scale, int64_t window) {
  constexpr int C = HD / 8, T = 8 / G;
  const int64_t row = kvh * HD;
  at::parallel_for(0, B * kvh, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float p[G][kMaxFastBlock + T];  // scores of one block (the last token group may overrun)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kvh, h = item % kvh;
      const int64_t n = ctx[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const scalar_t* qb = q + (b * nh + h * G) * HD;
      __m256 qv[G][C], acc[G][C];
      float mx[G], sum[G];
      const __m256 sv = _mm256_set1_ps(scale);
      for (int g = 0; g < G; ++g) {
        for (int c = 0; c < C; ++c) {
          qv[g][c] = _mm256_mul_ps(load8(qb + g * HD + c * 8), sv);
          acc[g][c] = _mm256_setzero_ps();
        }
        mx[g] = kNoScore;
        sum[g] = 0.f;
      }
      for (int64_t blk = first / bs; blk * bs < n; ++blk) {
        const int64_t t0 = std::max(blk * bs, first), nt = std::min((blk + 1) * bs, n) - t0;
        const int64_t slot0 = tables[b * maxb + blk] * bs + (t0 - blk * bs);
        if ((blk + 1) * bs < n) prefetch_block(kc, vc, tables[b * maxb + blk + 1] * bs, bs, row, h * HD, HD);
        const scalar_t* kb = kc + slot0 * row + h * HD;
        const scalar_t* vb = vc + slot0 * row + h * HD;
        // scores; the last group of tokens may run past nt (it reads token 0 again, and is unused)
        for (int64_t i = 0; i < nt; i += T) {
          __m256 part[8];
          for (int t = 0; t < T; ++t) {
            const scalar_t* kr = kb + (i + t < nt ? i + t : 0) * row;
            __m256 kv[C];
            for (int c = 0; c < C; ++c) kv[c] = load8(kr + c * 8);
            for (int g = 0; g < G; ++g) {
              __m256 a = _mm256_mul_ps(qv[g][0], kv[0]);
              for (int c = 1; c < C; ++c) a = _mm256_fmadd_ps(qv[g][c], kv[c], a);
              part[t * G + g] = a;
            }
          }
          alignas(32) float s[8];
          _mm256_store_ps(s, hsum8(part));
          for (int t = 0; t < T; ++t)
            for (int g = 0; g < G; ++g) p[g][i + t] = s[t * G + g];
        }
        for (int g = 0; g < G; ++g) {
          const __m256 r = _mm256_set1_ps(online_softmax_block(p[g], nt, mx[g], sum[g]));
          for (int c = 0; c < C; ++c) acc[g][c] = _mm256_mul_ps(acc[g][c], r);
        }
        for (int64_t i = 0; i < nt; ++i) {
          __m256 vv[C];
          for (int c = 0; c < C; ++c) vv[c] = load8(vb + i * row + c * 8);
          for (int g = 0; g < G; ++g) {
            const __m256 w = _mm256_set1_ps(p[g][i]);
            for (int c = 0; c < C; ++c) acc[g][c] = _mm256_fmadd_ps(w, vv[c], acc[g][c]);
          }
        }
      }
      scalar_t* ob = out + (b * nh + h * G) * HD;
      for (int g = 0; g < G; ++g) {
        const __m256 inv = _mm256_set1_ps(1.f / sum[g]);
        for (int c = 0; c < C; ++c) {
          alignas(32) float o[8];
          _mm256_store_ps(o, _mm256_mul_ps(acc[g][c], inv));
          for (int e = 0; e < 8; ++e) ob[g * HD + c * 8 + e] = static_cast<scalar_t>(o[e]);
        }
      }
    }
  });
}

// The fast path for this (head dim, group) if there is one: returns false to take the generic path.
template <typename scalar_t, int HD>
static bool run_avx2_for_dim(int64_t G, const scalar_t* q, const scalar_t* kc, const scalar_t* vc,
                             const int64_t* tables, const int64_t* ctx, scalar_t* out, int64_t B, int64_t nh,
                             int64_t kvh, int64_t bs, int64_t maxb, float scale, int64_t window) {
  auto run = [&](auto kernel) {
    kernel(q, kc, vc, tables, ctx, out, B, nh, kvh, bs, maxb, scale, window);
    return true;
  };
  switch (G) {
    case 1: return run(decode_kernel_avx2<scalar_t, HD, 1>);
    case 2: return run(decode_kernel_avx2<scalar_t, HD, 2>);
    case 4: return run(decode_kernel_avx2<scalar_t, HD, 4>);
    case 8: return run(decode_kernel_avx2<scalar_t, HD, 8>);
    default: return false;
  }
}

template <typename scalar_t>
static bool run_avx2(int64_t hd, int64_t G, const scalar_t* q, const scalar_t* kc, const scalar_t* vc,
                     const int64_t* tables, const int64_t* ctx, scalar_t* out, int64_t B, int64_t nh, int64_t kvh,
                     int64_t bs, int64_t maxb, float scale, int64_t window) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else if (bs > kMaxFastBlock) {
    return false;
  } else {
    switch (hd) {
      case 32:
        return run_avx2_for_dim<scalar_t, 32>(G, q, kc, vc, tables, ctx, out, B, nh, kvh, bs, maxb, scale, window);
      case 64:
        return run_avx2_for_dim<scalar_t, 64>(G, q, kc, vc, tables, ctx, out, B, nh, kvh, bs, maxb, scale, window);
      case 128:
        return run_avx2_for_dim<scalar_t, 128>(G, q, kc, vc, tables, ctx, out, B, nh, kvh, bs, maxb, scale, window);
      default:
        return false;
    }
  }
}
#endif

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
#ifdef DISAGG_AVX2
    if (run_avx2<scalar_t>(hd, nh / kvh, qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                           v_cache.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), ctx.data_ptr<int64_t>(),
                           out.data_ptr<scalar_t>(), B, nh, kvh, bs, tables.size(1), static_cast<float>(scale),
                           window))
      return;
#endif
    auto run = [&](auto kernel) {
      kernel(qc.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
             tables.data_ptr<int64_t>(), ctx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, nh, kvh, hd, bs,
             tables.size(1), static_cast<float>(scale), window);
    };
    switch (hd) {
      case 32: run(decode_kernel<scalar_t, 32>); break;
      case 64: run(decode_kernel<scalar_t, 64>); break;
      case 128: run(decode_kernel<scalar_t, 128>); break;
      default: run(decode_kernel<scalar_t, 0>); break;
    }
  });
  return out;
}

