// x86 instruction-set levels of the CPU MXFP4 kernels (mxfp4_gemv.cpp, mxfp4_mm.cpp), one place.
//
// A kernel runs the widest level that both the CPU (cpuid) and ATen's CPU capability allow, so that
// ATEN_CPU_CAPABILITY=avx2/default also narrows our kernels, as it does ATen's own; each kernel caps it
// at the widest path it has and may be forced narrower by its test hook (an override < 0 means none).
#pragma once

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define TME_X86_SIMD 1
#include <immintrin.h>
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define TME_AVX512_BF16 1
#endif
#endif

namespace tme_cpu {

constexpr int kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx512Bf16 = 3;

// The widest level this process may use; computed once.
inline int detected_isa() {
#ifdef TME_X86_SIMD
  static const int isa = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    __builtin_cpu_init();
#ifdef TME_AVX512_BF16
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
      return kIsaAvx512Bf16;
#endif
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f")) return kIsaAvx512;
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return kIsaAvx2;
    return kIsaScalar;
  }();
  return isa;
#else
  return kIsaScalar;
#endif
}

// Whether an AVX-512 path on byte / 16-bit lanes may run: the AVX-512 level above (so
// ATEN_CPU_CAPABILITY still narrows it) with the BW / VL / DQ subsets.
inline bool has_avx512_bw() {
#ifdef TME_X86_SIMD
  static const bool bw = detected_isa() >= kIsaAvx512 && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return bw;
#else
  return false;
#endif
}

// The same with VNNI (vpdpbusd): the integer GEMM's AVX-512 path.
inline bool has_avx512_vnni() {
#ifdef TME_X86_SIMD
  static const bool vnni = has_avx512_bw() && __builtin_cpu_supports("avx512vnni");
  return vnni;
#else
  return false;
#endif
}

// The level a kernel with paths up to `widest` runs now: the detected one, capped, or a narrower
// one forced through `override_isa`.
inline int current_isa(const std::atomic<int>& override_isa, int widest) {
  const int best = std::min(detected_isa(), widest);
  const int forced = override_isa.load(std::memory_order_relaxed);
  return forced >= 0 && forced < best ? forced : best;
}

// out[i] = v for an output of dtype out_t (float32, or bfloat16 / float16 rounded to nearest even).
inline void store_as(void* out, at::ScalarType out_t, int64_t i, float v) {
  switch (out_t) {
    case at::kBFloat16: static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v); break;
    case at::kHalf: static_cast<c10::Half*>(out)[i] = c10::Half(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

// out[i .. i + 3] = v[0 .. 3]: store_as for four consecutive outputs, one dtype switch.
inline void store4_as(void* out, at::ScalarType out_t, int64_t i, const float* v) {
  switch (out_t) {
    case at::kBFloat16:
      for (int k = 0; k < 4; ++k) static_cast<c10::BFloat16*>(out)[i + k] = c10::BFloat16(v[k]);
      break;
    case at::kHalf:
      for (int k = 0; k < 4; ++k) static_cast<c10::Half*>(out)[i + k] = c10::Half(v[k]);
      break;
    default:
      for (int k = 0; k < 4; ++k) static_cast<float*>(out)[i + k] = v[k];
      break;
  }
}

// Input rows sharing one decode / widening of a weight chunk in the GEMV kernels.
constexpr int kGemvRowTile = 4;

// The GEMV kernels' loop (mxfp4_gemv.cpp, int8_gemv.cpp): weight rows [0, N) split over ATen's
// threads (at least `grain` a task), visited in blocks of `row_block` rows that stay in L1 while
// every tile of up to kGemvRowTile input rows passes over them:
// tile(std::integral_constant<int, MT>{}, m0, n0, n1), MT the tile's row count.
template <typename Tile>
void for_each_gemv_tile(int64_t M, int64_t N, int64_t grain, int64_t row_block, const Tile& tile) {
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t b0 = n0; b0 < n1; b0 += row_block) {
      const int64_t b1 = std::min(n1, b0 + row_block);
      for (int64_t m0 = 0; m0 < M; m0 += kGemvRowTile) {
        switch (std::min<int64_t>(kGemvRowTile, M - m0)) {
          case 1: tile(std::integral_constant<int, 1>{}, m0, b0, b1); break;
          case 2: tile(std::integral_constant<int, 2>{}, m0, b0, b1); break;
          case 3: tile(std::integral_constant<int, 3>{}, m0, b0, b1); break;
          default: tile(std::integral_constant<int, 4>{}, m0, b0, b1); break;
        }
      }
    }
  });
}

#ifdef TME_X86_SIMD
// exp(x) as the attention kernels compute it (Cephes' expf): x = n ln2 + r with ln2 split in two (n ln2
// exact), exp(r) = 1 + r + r^2 p(r) with p of degree 5 (relative error about 2 float32 ulps), 2^n
// through the exponent bits.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp(x) for x <= 0 (softmax numerators: scores minus their row maximum; SiLU's exp(-|g|)), Cephes'
// expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial (relative error about 2 float32 ulps), 2^n through the exponent
// bits. x < -87 (weights below e^-87 of the row's largest, including masked-out keys at -inf) gives 0.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive_avx2(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);  // also true for -inf, false for NaN
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)));
}

// 8 bf16 values (their bits) as float32 lanes: exact, the bits shifted into float32's top half.
__attribute__((target("avx2"))) inline __m256 bf16x8_to_f32(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// dst[i] = float(src[i]) for n bf16 values (their bits), 8 at a time.
__attribute__((target("avx2"))) inline void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, bf16x8_to_f32(src + i));
  for (; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    __builtin_memcpy(dst + i, &bits, 4);
  }
}

// The sum of a register's 8 float32 lanes (the kernels' AVX2 reductions).
__attribute__((target("avx2"))) inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// [sum of a's lanes, b's, c's, d's]: four reductions in one hadd tree (float32 sums, in another order
// than hsum8's).
__attribute__((target("avx2"))) inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// A 512-bit register's two 256-bit halves added.
__attribute__((target("avx512f"))) inline __m256 add_halves(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// hsum8x4 for four 512-bit registers: each one's halves added first.
__attribute__((target("avx512f"))) inline __m128 hsum16x4(__m512 a, __m512 b, __m512 c, __m512 d) {
  return hsum8x4(add_halves(a), add_halves(b), add_halves(c), add_halves(d));
}
#endif

}  // namespace tme_cpu
