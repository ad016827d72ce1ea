// Int8 weight-only GEMV for CPUs: y[m, n] = fl32(sum_k x[m, k] * q[n, k]) * s[n] (+ bias[n]), with
// q int8 [N, K] and one scale per output row s [N] -- the output head of quantize_output_head("int8").
//
// The CPU kernel of torchao_mx_ext::int8_gemv; the operator (schema, fake kernel, pure-torch
// fallback) is defined in Python: torchao_mx_ext/kernels/cpu_int8_gemv.py. Numbers: x is widened to
// float32 from its own dtype, every product x * q is exact in float32 (an 8-bit times a 24-bit
// significand), the sums are float32 (order differs from ATen's _weight_int8pack_mm), the row's sum is
// multiplied by fl32(s[n]), the bias added in float32, and the result rounded once to out_dtype.
//
// Why not ATen's _weight_int8pack_mm: at batch 1 the head is the largest GEMV of a small decoder
// (SmolLM2-135M: 49152 x 576), memory-bound at 1 byte a weight, and ATen's kernel runs it at well
// under the memory bandwidth on AVX2 CPUs (benchmarks/gemv_bench.py). Here: AVX2 widens 8 codes to
// float32 per step (vpmovsxbd + vcvtdq2ps) into FMAs, prefetching the weight ahead: for one row of x
// (decode) one weight row after the other, its codes read as one stream; for more, 4 weight rows at a
// time (independent chains, one load of x for all) and up to 4 rows of x share each widened chunk.
// Scalar elsewhere.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "cpu_ops.h"

namespace {

using tme_cpu::kIsaAvx2;
using tme_cpu::kIsaScalar;
std::atomic<int> g_isa_override{-1};

int current_isa() { return tme_cpu::current_isa(g_isa_override, kIsaAvx2); }

struct Problem {
  const float* x;      // [M, K] float32
  const int8_t* q;     // [N, K]
  const float* s;      // [N]
  const float* bias;   // [N] or nullptr
  void* out;           // [M, N] of out_t
  at::ScalarType out_t;
  int64_t M, N, K;
};

inline void store(const Problem& p, int64_t m, int64_t n, float dot) {
  float v = dot * p.s[n];
  if (p.bias) v += p.bias[n];
  tme_cpu::store_as(p.out, p.out_t, m * p.N + n, v);
}

template <int MT>
void tile_scalar(const Problem& p, int64_t m0, int64_t n) {
  const int8_t* q = p.q + n * p.K;
  float acc[MT] = {};
  for (int64_t k = 0; k < p.K; ++k)
    for (int m = 0; m < MT; ++m) acc[m] += p.x[(m0 + m) * p.K + k] * static_cast<float>(q[k]);
  for (int m = 0; m < MT; ++m) store(p, m0 + m, n, acc[m]);
}

#ifdef TME_X86_SIMD
// The weight streams from memory once per call (the head is larger than the caches) and the hardware
// prefetcher alone keeps too few lines in flight: 2x the GEMV's speed on Zen 3 with this (49152 x 576,
// one thread, ad hoc: 6.5 -> 12-13 G multiply-adds/s), about 2 weight tiles ahead.
constexpr int64_t kPrefetchBytes = 4608;
// One x row (decode): weight rows one after the other, so the codes are one forward stream, with lines
// asked for into L1 kNearBytes ahead and into L2 kFarBytes ahead. Four rows side by side (the tile
// below) read four short streams, which the hardware prefetcher does not follow. Ad hoc on Zen 3 (one
// thread, 49152 x 576 out of cache): 2.3 ms as tiles, 1.55 ms as one stream; alone, reading those
// 28 MB takes 1.3 ms, and so does the arithmetic with the weight in cache.
constexpr int64_t kNearBytes = 1024, kFarBytes = 8192;

// x row m against weight rows n0..n1-1, one row at a time (four accumulators over k).
__attribute__((target("avx2,fma"))) void rows_stream_avx2(const Problem& p, int64_t m, int64_t n0, int64_t n1) {
  const float* x = p.x + m * p.K;
  const int64_t K32 = p.K / 32 * 32, K8 = p.K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = p.q + n * p.K;
    for (int64_t o = 0; o < p.K; o += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(q + o + kNearBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q + o + kFarBytes), _MM_HINT_T1);
    }
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k < K32; k += 32) {
      for (int i = 0; i < 4; ++i) {
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k + 8 * i))));
        acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + k + 8 * i), acc[i]);
      }
    }
    for (; k < K8; k += 8) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k))));
      acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + k), acc[0]);
    }
    float dot = tme_cpu::hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; k < p.K; ++k) dot += x[k] * static_cast<float>(q[k]);
    store(p, m, n, dot);
  }
}

// x rows m0..m0+MT-1 against weight rows n..n+NR-1.
template <int MT, int NR>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t m0, int64_t n) {
  const int64_t K8 = p.K / 8 * 8;
  __m256 acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    if (k % 64 == 0) {  // one cache line of each row: ask for the one kPrefetchBytes ahead
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(p.q + (n + r) * p.K + k + kPrefetchBytes), _MM_HINT_T0);
    }
    for (int r = 0; r < NR; ++r) {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.q + (n + r) * p.K + k));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.x + (m0 + m) * p.K + k), acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < NR; ++r) {
      float dot = tme_cpu::hsum8(acc[m][r]);
      for (int64_t k = K8; k < p.K; ++k) dot += p.x[(m0 + m) * p.K + k] * static_cast<float>(p.q[(n + r) * p.K + k]);
      store(p, m0 + m, n + r, dot);
    }
  }
}
#endif

template <int MT>
void rows(int isa, const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  int64_t n = n0;
#ifdef TME_X86_SIMD
  if (isa >= kIsaAvx2) {
    if (MT == 1 && p.M == 1) return rows_stream_avx2(p, m0, n0, n1);
    constexpr int NR = MT == 1 ? 4 : MT == 2 ? 2 : 1;
    for (; n + NR <= n1; n += NR) tile_avx2<MT, NR>(p, m0, n);
    for (; n < n1; ++n) tile_avx2<MT, 1>(p, m0, n);
    return;
  }
#endif
  for (; n < n1; ++n) tile_scalar<MT>(p, m0, n);
}

constexpr int64_t kRowBlock = 16;     // weight rows every x row tile visits while they are in L1
constexpr int64_t kGrainBytes = 64 * 1024;  // weight bytes per parallel task: small GEMVs stay on one thread

// Test hook: force a narrower code path (0 scalar, 1 AVX2; -1 = best available). Returns the path now in use.
int64_t int8_gemv_set_isa(int64_t isa) {
  g_isa_override.store(static_cast<int>(isa));
  return current_isa();
}

}  // namespace

namespace tme_ops {

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scales.device().is_cpu(), "int8_gemv: CPU tensors expected");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "int8_gemv: qweight must be a 2-D int8 tensor");
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), "int8_gemv: x must be a floating-point tensor");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x.size(-1) == K, "int8_gemv: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N && at::isFloatingType(scales.scalar_type()),
              "int8_gemv: scales must be a floating [N] tensor, N = ", N);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(), "int8_gemv: bias must be a CPU [N] tensor");
  }
  const at::ScalarType out_t = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(out_t == at::kFloat || out_t == at::kBFloat16 || out_t == at::kHalf,
              "int8_gemv: out_dtype must be float32, bfloat16 or float16");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  auto out = at::empty(out_shape, x.options().dtype(out_t));
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  if (M == 0 || N == 0) return K == 0 ? out.zero_() : out;

  const auto xf = x.to(at::kFloat).contiguous();
  const auto q = qweight.contiguous();
  const auto s = scales.to(at::kFloat).contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  Problem p{xf.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(),
            bias.has_value() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(), out_t, M, N, K};
  const int isa = current_isa();
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / K);
  tme_cpu::for_each_gemv_tile(M, N, grain, kRowBlock, [&](auto mt, int64_t m0, int64_t n0, int64_t n1) {
    rows<decltype(mt)::value>(isa, p, m0, n0, n1);
  });
  return out;
}

}  // namespace tme_ops

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) { m.def("_int8_gemv_set_isa(int isa) -> int", &int8_gemv_set_isa); }

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) { m.impl("int8_gemv", &tme_ops::int8_gemv); }
