// MXFP4 quantize-dequantize of float32 activations for CPUs, in one pass:
//   out = RNE_E2M1(x * 2^-e) * 2^e   per block of B elements, e from the block's amax by the scale rule
// (floor, even, rceil; mse: the floor exponent or the one above, whichever reconstructs the block with
// the smaller squared error, ties keeping floor). A block holding a NaN or Inf is all NaN.
// The CPU kernel of torchao_mx_ext::mxfp4_fake_quantize; the operator (schema, fake kernel, pure-torch
// fallback) is defined in Python: torchao_mx_ext/kernels/cpu_mxfp4_quantize.py.
//
// The operations are those of torchao_mx_ext/mx (quantize.py, e8m0.py, e2m1.py), one for one in float32:
// the exponent from amax's bits, x * 2^-e, the E2M1 rounding as round-half-even of |v| / spacing, the
// product with 2^e. So the output is bit-equal to mxfp4_fake_quantize for floor, even and rceil. For
// mse the two candidates' squared errors are float32 sums whose order is not the pure-torch one (which
// itself differs between eager and Inductor): a block whose two errors agree to float32 rounding may
// take the other, equally good, candidate.
//
// torchao_mx_ext::mxfp4_rotate_fake_quantize fuses the online block rotation in front of it:
//   out = Q(x R)   with R = diag(b x b block, ...), b a multiple of 16 up to kMaxRotation,
// each rotated value an FMA chain over the block's rows in order (y_j = fma(x_{b-1}, R_{b-1,j}, ...
// fma(x_0, R_{0,j}, 0))), the same on the scalar, AVX2 and AVX-512 paths, so they are bit-equal; against
// torch's matmul (x.view(..., b) @ R) only the float32 summation order differs. Scale rule "none":
// the rotation alone (weight-only linears). One call instead of a rotation matmul and a quantizer call:
// about 2.5-3x faster for one row (decode), the same at 512 rows (benchmarks/activation_quant_bench.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "mxfp4_fake_quantize.h"

namespace {

constexpr int kFloor = 0, kEven = 1, kRceil = 2, kMse = 3, kNone = 4;
constexpr int64_t kMaxRotation = 256;
constexpr int kMinExp = -127, kMaxExp = 127;

using tme_cpu::kIsaAvx2;
using tme_cpu::kIsaAvx512;
using tme_cpu::kIsaScalar;
std::atomic<int> g_isa_override{-1};

int current_isa() { return tme_cpu::current_isa(g_isa_override, tme_cpu::has_avx512_bw() ? kIsaAvx512 : kIsaAvx2); }

inline uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// e8m0.py's shared_exponent: k = floor(log2(amax)) from the exponent field (zero / subnormal: -127).
inline int shared_exponent(float amax, int rule) {
  const uint32_t bits = bits_of(amax);
  const int k = int((bits >> 23) & 0xFF) - 127;
  int e = k - 2;
  if (rule == kEven) {
    e = int(((bits + (1u << 21)) >> 23) & 0xFF) - 127 - 2;
  } else if (rule == kRceil) {
    e += (bits & 0x7FFFFF) > (1u << 22) ? 1 : 0;
  }
  return std::min(std::max(e, kMinExp), kMaxExp);
}

// e8m0.py's exp2_int: exact 2^e for e in [-127, 127] (2^-127 the one subnormal).
inline float exp2_int(int e) { return e >= kMinExp + 1 ? float_of(uint32_t(e + 127) << 23) : float_of(1u << 22); }

// e2m1.py's round_to_e2m1 on one value.
inline float round_e2m1(float v) {
  const float a = std::fabs(v);
  const float spacing = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
  const float q = std::min(std::nearbyint(a / spacing) * spacing, 6.0f);  // nearbyint: half to even
  return std::copysign(q, v);
}

// One block: out = q * 2^e for exponent e; returns the float32 squared error (for mse).
inline float block_scalar(const float* x, int64_t B, int e, float* out) {
  const float inv = exp2_int(-e), scale = exp2_int(e);
  float err = 0.0f;
  for (int64_t i = 0; i < B; ++i) {
    out[i] = round_e2m1(x[i] * inv) * scale;
    const float d = x[i] - out[i];
    err += d * d;
  }
  return err;
}

// y = x R for one b-wide chunk (R row-major b x b): per output an FMA chain over i = 0 .. b-1.
inline void rotate_chunk_scalar(const float* x, const float* R, int64_t b, float* y) {
  for (int64_t j = 0; j < b; ++j) y[j] = 0.0f;
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j) y[j] = std::fma(x[i], R[i * b + j], y[j]);
}

// Row r of x, rotated chunk by chunk into dst (R == nullptr: x's own row, nothing written).
inline const float* rotated_row_scalar(const float* x, int64_t r, int64_t K, const float* R, int64_t rb, float* dst) {
  if (R == nullptr) return x + r * K;
  for (int64_t c = 0; c < K; c += rb) rotate_chunk_scalar(x + r * K + c, R, rb, dst + c);
  return dst;
}

void rows_scalar(const float* x, float* out, int64_t r0, int64_t r1, int64_t K, int64_t B, int rule, const float* R = nullptr,
                 int64_t rb = 0) {
  std::vector<float> up(rule == kNone ? 0 : B), rot(R != nullptr && rule != kNone ? K : 0);
  for (int64_t r = r0; r < r1; ++r) {
    if (rule == kNone) {  // the rotation alone
      rotated_row_scalar(x, r, K, R, rb, out + r * K);
      continue;
    }
    const float* xrow = rotated_row_scalar(x, r, K, R, rb, rot.data());
    for (int64_t b = 0; b < K / B; ++b) {
      const float* xb = xrow + b * B;
      float* ob = out + r * K + b * B;
      float amax = 0.0f;
      bool nonfinite = false;
      for (int64_t i = 0; i < B; ++i) {
        nonfinite |= !std::isfinite(xb[i]);
        amax = std::max(amax, std::fabs(xb[i]));
      }
      if (nonfinite) {
        for (int64_t i = 0; i < B; ++i) ob[i] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const int e = shared_exponent(amax, rule);
      const float err = block_scalar(xb, B, e, ob);
      if (rule == kMse) {
        const int e_up = std::min(e + 1, kMaxExp);
        if (block_scalar(xb, B, e_up, up.data()) < err) std::memcpy(ob, up.data(), B * sizeof(float));
      }
    }
  }
}

#ifdef TME_X86_SIMD
#define TME_FQ_TARGET "avx512f,avx512bw,avx512vl,avx512dq"

// round_e2m1(x * inv) * scale for 16 values.
__attribute__((target(TME_FQ_TARGET))) inline __m512 quantize16(__m512 x, __m512 inv, __m512 scale) {
  const __m512 v = _mm512_mul_ps(x, inv);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 a = _mm512_andnot_ps(sign, v);
  // |v| / spacing with spacing 0.5, 1, 2 below 2, 4 and above, as exact multiplies by 2, 1, 0.5 (a
  // division, the same bits, cost about 40% of the whole quantizer at a 512-token prefill)
  const __mmask16 below2 = _mm512_cmp_ps_mask(a, _mm512_set1_ps(2.0f), _CMP_LT_OQ);
  const __mmask16 below4 = _mm512_cmp_ps_mask(a, _mm512_set1_ps(4.0f), _CMP_LT_OQ);
  __m512 spacing = _mm512_set1_ps(2.0f), inv_spacing = _mm512_set1_ps(0.5f);
  spacing = _mm512_mask_mov_ps(spacing, below4, _mm512_set1_ps(1.0f));
  spacing = _mm512_mask_mov_ps(spacing, below2, _mm512_set1_ps(0.5f));
  inv_spacing = _mm512_mask_mov_ps(inv_spacing, below4, _mm512_set1_ps(1.0f));
  inv_spacing = _mm512_mask_mov_ps(inv_spacing, below2, _mm512_set1_ps(2.0f));
  const __m512 steps = _mm512_roundscale_ps(_mm512_mul_ps(a, inv_spacing), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 q = _mm512_min_ps(_mm512_mul_ps(steps, spacing), _mm512_set1_ps(6.0f));
  return _mm512_mul_ps(_mm512_or_ps(q, _mm512_and_ps(v, sign)), scale);  // copysign, then the scale
}

// One block of B (a multiple of 16) values at exponent e into out; returns the float32 squared error.
__attribute__((target(TME_FQ_TARGET))) inline float block_avx512(const float* x, int64_t B, int e, float* out) {
  const __m512 inv = _mm512_set1_ps(exp2_int(-e)), scale = _mm512_set1_ps(exp2_int(e));
  __m512 err = _mm512_setzero_ps();
  for (int64_t i = 0; i < B; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    const __m512 o = quantize16(xv, inv, scale);
    _mm512_storeu_ps(out + i, o);
    const __m512 d = _mm512_sub_ps(xv, o);
    err = _mm512_fmadd_ps(d, d, err);
  }
  return _mm512_reduce_add_ps(err);
}

// y = x R for G consecutive b-wide chunks of a row, NV x 16 output columns from c0: per output the
// same FMA chain as rotate_chunk_scalar (i = 0 .. b-1, from zero), so the same bits. G x NV independent
// chains hide the FMA latency (one chunk's two chains alone ran at a quarter of the FMA throughput).
template <int NV, int G>
__attribute__((target(TME_FQ_TARGET))) inline void rotate_chunks_avx512(const float* x, const float* R, int64_t b, int64_t c0,
                                                                        float* y) {
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < b; ++i) {
    __m512 r[NV];
    for (int v = 0; v < NV; ++v) r[v] = _mm512_loadu_ps(R + i * b + c0 + 16 * v);
    for (int g = 0; g < G; ++g) {
      const __m512 xi = _mm512_set1_ps(x[g * b + i]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(xi, r[v], acc[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + g * b + c0 + 16 * v, acc[g][v]);
}

template <int NV, int G>
__attribute__((target(TME_FQ_TARGET))) inline void rotate_row_avx512(const float* x, int64_t K, const float* R, int64_t rb, float* y) {
  int64_t c = 0;
  for (; c + G * rb <= K; c += G * rb)
    for (int64_t c0 = 0; c0 < rb; c0 += 16 * NV) rotate_chunks_avx512<NV, G>(x + c, R, rb, c0, y + c);
  for (; c < K; c += rb)
    for (int64_t c0 = 0; c0 < rb; c0 += 16 * NV) rotate_chunks_avx512<NV, 1>(x + c, R, rb, c0, y + c);
}

__attribute__((target(TME_FQ_TARGET))) inline const float* rotated_row_avx512(const float* x, int64_t r, int64_t K, const float* R,
                                                                              int64_t rb, float* dst) {
  if (R == nullptr) return x + r * K;
  if (rb % 32 == 0)
    rotate_row_avx512<2, 4>(x + r * K, K, R, rb, dst);
  else
    rotate_row_avx512<1, 8>(x + r * K, K, R, rb, dst);
  return dst;
}

// Blocks of 32 (two registers) without a branch on the data: the mse candidate is picked with a
// mask, not a branch and a copy. The same operations as block_avx512 (squared errors summed as
// fma(d1, d1, d0 * d0), then reduced), so the same bits; about 2x faster at a 512-token prefill, where
// the branch mispredicted on about every other block and serialised the blocks' latency chains.
__attribute__((target(TME_FQ_TARGET))) inline void blocks32_avx512(const float* x, float* out, int64_t nblocks, int rule) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    const __m512 a0 = _mm512_and_ps(x0, abs_mask), a1 = _mm512_and_ps(x1, abs_mask);
    if (_mm512_cmp_ps_mask(a0, fmax, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, fmax, _CMP_NLE_UQ)) {  // NaN or Inf: all NaN
      _mm512_storeu_ps(out + 32 * b, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
      _mm512_storeu_ps(out + 32 * b + 16, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    const int e = shared_exponent(_mm512_reduce_max_ps(_mm512_max_ps(a0, a1)), rule);
    __m512 inv = _mm512_set1_ps(exp2_int(-e)), scale = _mm512_set1_ps(exp2_int(e));
    __m512 o0 = quantize16(x0, inv, scale), o1 = quantize16(x1, inv, scale);
    if (rule == kMse) {  // loop-invariant: predicted
      const int e_up = std::min(e + 1, kMaxExp);
      inv = _mm512_set1_ps(exp2_int(-e_up));
      scale = _mm512_set1_ps(exp2_int(e_up));
      const __m512 u0 = quantize16(x0, inv, scale), u1 = quantize16(x1, inv, scale);
      const __m512 d0 = _mm512_sub_ps(x0, o0), d1 = _mm512_sub_ps(x1, o1);
      const __m512 g0 = _mm512_sub_ps(x0, u0), g1 = _mm512_sub_ps(x1, u1);
      const float err = _mm512_reduce_add_ps(_mm512_fmadd_ps(d1, d1, _mm512_mul_ps(d0, d0)));
      const float err_up = _mm512_reduce_add_ps(_mm512_fmadd_ps(g1, g1, _mm512_mul_ps(g0, g0)));
      const __mmask16 take_up = static_cast<__mmask16>(-static_cast<int>(err_up < err));
      o0 = _mm512_mask_mov_ps(o0, take_up, u0);
      o1 = _mm512_mask_mov_ps(o1, take_up, u1);
    }
    _mm512_storeu_ps(out + 32 * b, o0);
    _mm512_storeu_ps(out + 32 * b + 16, o1);
  }
}

__attribute__((target(TME_FQ_TARGET))) void rows_avx512(const float* x, float* out, int64_t r0, int64_t r1, int64_t K, int64_t B,
                                                        int rule, const float* R = nullptr, int64_t rb = 0) {
  std::vector<float> up(rule == kNone ? 0 : B), rot(R != nullptr && rule != kNone ? K : 0);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t r = r0; r < r1; ++r) {
    if (rule == kNone) {
      rotated_row_avx512(x, r, K, R, rb, out + r * K);
      continue;
    }
    const float* xrow = rotated_row_avx512(x, r, K, R, rb, rot.data());
    if (B == 32) {
      blocks32_avx512(xrow, out + r * K, K / 32, rule);
      continue;
    }
    for (int64_t b = 0; b < K / B; ++b) {
      const float* xb = xrow + b * B;
      float* ob = out + r * K + b * B;
      // amax, and whether the block is all finite (an exponent field of 255 is NaN or Inf)
      __m512 amax = _mm512_setzero_ps();
      __mmask16 nonfinite = 0;
      for (int64_t i = 0; i < B; i += 16) {
        const __m512 a = _mm512_and_ps(_mm512_loadu_ps(xb + i), abs_mask);
        nonfinite |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
        amax = _mm512_max_ps(amax, a);
      }
      if (nonfinite) {
        for (int64_t i = 0; i < B; i += 16) _mm512_storeu_ps(ob + i, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      const int e = shared_exponent(_mm512_reduce_max_ps(amax), rule);
      const float err = block_avx512(xb, B, e, ob);
      if (rule == kMse) {
        const int e_up = std::min(e + 1, kMaxExp);
        if (block_avx512(xb, B, e_up, up.data()) < err) std::memcpy(ob, up.data(), B * sizeof(float));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: the same operations as the AVX-512 path, 8 lanes at a time (blends for its masks).

#define TME_FQ_AVX2_TARGET "avx2,fma"

// round_e2m1(x * inv) * scale for 8 values.
__attribute__((target(TME_FQ_AVX2_TARGET))) inline __m256 quantize8(__m256 x, __m256 inv, __m256 scale) {
  const __m256 v = _mm256_mul_ps(x, inv);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, v);
  const __m256 below2 = _mm256_cmp_ps(a, _mm256_set1_ps(2.0f), _CMP_LT_OQ);
  const __m256 below4 = _mm256_cmp_ps(a, _mm256_set1_ps(4.0f), _CMP_LT_OQ);
  const __m256 spacing = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_set1_ps(2.0f), _mm256_set1_ps(1.0f), below4), _mm256_set1_ps(0.5f), below2);
  const __m256 inv_spacing = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f), below4), _mm256_set1_ps(2.0f), below2);
  const __m256 steps = _mm256_round_ps(_mm256_mul_ps(a, inv_spacing), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 q = _mm256_min_ps(_mm256_mul_ps(steps, spacing), _mm256_set1_ps(6.0f));
  return _mm256_mul_ps(_mm256_or_ps(q, _mm256_and_ps(v, sign)), scale);
}

__attribute__((target(TME_FQ_AVX2_TARGET))) inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// One block of B (a multiple of 8) values at exponent e into out; returns the float32 squared error.
__attribute__((target(TME_FQ_AVX2_TARGET))) inline float block_avx2(const float* x, int64_t B, int e, float* out) {
  const __m256 inv = _mm256_set1_ps(exp2_int(-e)), scale = _mm256_set1_ps(exp2_int(e));
  __m256 err = _mm256_setzero_ps();
  for (int64_t i = 0; i < B; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 o = quantize8(xv, inv, scale);
    _mm256_storeu_ps(out + i, o);
    const __m256 d = _mm256_sub_ps(xv, o);
    err = _mm256_fmadd_ps(d, d, err);
  }
  return hsum8(err);
}

// y = x R for G consecutive b-wide chunks, NV x 8 output columns from c0: the FMA chains of
// rotate_chunk_scalar (the same bits), G x NV of them at a time to hide the FMA latency.
template <int NV, int G>
__attribute__((target(TME_FQ_AVX2_TARGET))) inline void rotate_chunks_avx2(const float* x, const float* R, int64_t b, int64_t c0, float* y) {
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < b; ++i) {
    __m256 r[NV];
    for (int v = 0; v < NV; ++v) r[v] = _mm256_loadu_ps(R + i * b + c0 + 8 * v);
    for (int g = 0; g < G; ++g) {
      const __m256 xi = _mm256_set1_ps(x[g * b + i]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm256_fmadd_ps(xi, r[v], acc[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y + g * b + c0 + 8 * v, acc[g][v]);
}

template <int NV, int G>
__attribute__((target(TME_FQ_AVX2_TARGET))) inline void rotate_row_avx2(const float* x, int64_t K, const float* R, int64_t rb, float* y) {
  int64_t c = 0;
  for (; c + G * rb <= K; c += G * rb)
    for (int64_t c0 = 0; c0 < rb; c0 += 8 * NV) rotate_chunks_avx2<NV, G>(x + c, R, rb, c0, y + c);
  for (; c < K; c += rb)
    for (int64_t c0 = 0; c0 < rb; c0 += 8 * NV) rotate_chunks_avx2<NV, 1>(x + c, R, rb, c0, y + c);
}

__attribute__((target(TME_FQ_AVX2_TARGET))) inline const float* rotated_row_avx2(const float* x, int64_t r, int64_t K, const float* R,
                                                                                int64_t rb, float* dst) {
  if (R == nullptr) return x + r * K;
  if (rb % 32 == 0)
    rotate_row_avx2<4, 2>(x + r * K, K, R, rb, dst);  // 8 accumulators, 4 rotation rows, 1 broadcast
  else
    rotate_row_avx2<2, 4>(x + r * K, K, R, rb, dst);
  return dst;
}

__attribute__((target(TME_FQ_AVX2_TARGET))) void rows_avx2(const float* x, float* out, int64_t r0, int64_t r1, int64_t K, int64_t B,
                                                           int rule, const float* R = nullptr, int64_t rb = 0) {
  std::vector<float> up(rule == kNone ? 0 : B), rot(R != nullptr && rule != kNone ? K : 0);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  for (int64_t r = r0; r < r1; ++r) {
    if (rule == kNone) {
      rotated_row_avx2(x, r, K, R, rb, out + r * K);
      continue;
    }
    const float* xrow = rotated_row_avx2(x, r, K, R, rb, rot.data());
    for (int64_t b = 0; b < K / B; ++b) {
      const float* xb = xrow + b * B;
      float* ob = out + r * K + b * B;
      __m256 amax = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
      for (int64_t i = 0; i < B; i += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask);
        nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // NaN or Inf
        amax = _mm256_max_ps(amax, a);
      }
      if (_mm256_movemask_ps(nonfinite)) {
        for (int64_t i = 0; i < B; i += 8) _mm256_storeu_ps(ob + i, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_movehdup_ps(m));
      const int e = shared_exponent(_mm_cvtss_f32(m), rule);
      const float err = block_avx2(xb, B, e, ob);
      if (rule == kMse) {
        const int e_up = std::min(e + 1, kMaxExp);
        if (block_avx2(xb, B, e_up, up.data()) < err) std::memcpy(ob, up.data(), B * sizeof(float));
      }
    }
  }
}
#endif  // TME_X86_SIMD

int rule_index(const std::string& rule, bool allow_none = false) {
  if (rule == "floor") return kFloor;
  if (rule == "even") return kEven;
  if (rule == "rceil") return kRceil;
  if (rule == "mse") return kMse;
  if (allow_none && rule == "none") return kNone;
  TORCH_CHECK(false, "mxfp4_fake_quantize: scale rule must be floor, even, rceil or mse", allow_none ? " (or none)" : "", ", got ",
              rule);
}

// Rows r0..r1-1 of out = Q(x R) (R == nullptr: Q(x); rule kNone: x R), on the widest path allowed.
void quantize_rows(int isa, const float* x, float* out, int64_t r0, int64_t r1, int64_t K, int64_t B, int rule, const float* R,
                   int64_t rb) {
#ifdef TME_X86_SIMD
  if (isa == kIsaAvx512) return rows_avx512(x, out, r0, r1, K, B, rule, R, rb);
  if (isa == kIsaAvx2) return rows_avx2(x, out, r0, r1, K, B, rule, R, rb);
#endif
  rows_scalar(x, out, r0, r1, K, B, rule, R, rb);
}

// The checks both operators (and mxfp4_gemv's input transform) make; returns the rule's index.
int check_quantize_args(const char* op, int64_t K, const at::Tensor* rotation, int64_t block_size, c10::string_view scale_rule) {
  const int rule = rule_index(std::string(scale_rule), /*allow_none=*/rotation != nullptr);
  if (rotation != nullptr) {
    TORCH_CHECK(rotation->device().is_cpu() && rotation->scalar_type() == at::kFloat && rotation->dim() == 2 &&
                    rotation->size(0) == rotation->size(1),
                op, ": the rotation must be a square float32 CPU matrix, got ", rotation->sizes());
    const int64_t rb = rotation->size(0);
    TORCH_CHECK(rb > 0 && rb % 16 == 0 && rb <= kMaxRotation, op, ": the rotation block must be a multiple of 16 up to ", kMaxRotation,
                ", got ", rb);
    TORCH_CHECK(K % rb == 0, op, ": the width ", K, " is not a multiple of the rotation block ", rb);
  }
  if (rule != kNone) {
    TORCH_CHECK(block_size > 0 && block_size % 32 == 0, op, ": block_size must be a multiple of 32, got ", block_size);
    TORCH_CHECK(K % block_size == 0, op, ": the width ", K, " is not a multiple of ", block_size);
  }
  return rule;
}

at::Tensor mxfp4_fake_quantize(const at::Tensor& x, int64_t block_size, c10::string_view scale_rule) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "mxfp4_fake_quantize: a float32 CPU tensor expected");
  TORCH_CHECK(x.dim() >= 1, "mxfp4_fake_quantize: x must have at least one dimension");
  const int64_t K = x.size(-1);
  const int rule = check_quantize_args("mxfp4_fake_quantize", K, nullptr, block_size, scale_rule);
  const auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t R = K == 0 ? 0 : xc.numel() / K;
  if (R == 0) return out;
  const int isa = current_isa();
  at::parallel_for(0, R, std::max<int64_t>(1, 8192 / K), [&](int64_t r0, int64_t r1) {
    quantize_rows(isa, xc.data_ptr<float>(), out.data_ptr<float>(), r0, r1, K, block_size, rule, nullptr, 0);
  });
  return out;
}

at::Tensor mxfp4_rotate_fake_quantize(const at::Tensor& x, const at::Tensor& rotation, int64_t block_size, c10::string_view scale_rule) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "mxfp4_rotate_fake_quantize: a float32 CPU tensor expected");
  TORCH_CHECK(x.dim() >= 1, "mxfp4_rotate_fake_quantize: x must have at least one dimension");
  const int64_t K = x.size(-1);
  const int rule = check_quantize_args("mxfp4_rotate_fake_quantize", K, &rotation, block_size, scale_rule);
  const int64_t rb = rotation.size(0);
  const auto xc = x.contiguous();
  const auto rc = rotation.contiguous();
  auto out = at::empty_like(xc);
  const int64_t R = K == 0 ? 0 : xc.numel() / K;
  if (R == 0) return out;
  const int isa = current_isa();
  // A row costs about rb times more here than in mxfp4_fake_quantize: a smaller grain.
  at::parallel_for(0, R, std::max<int64_t>(1, 8192 / (K * rb / 16)), [&](int64_t r0, int64_t r1) {
    quantize_rows(isa, xc.data_ptr<float>(), out.data_ptr<float>(), r0, r1, K, block_size, rule, rc.data_ptr<float>(), rb);
  });
  return out;
}

// Test hook: cap the code path (0 scalar, 1 AVX2, 2 AVX-512; -1 = best available). Returns the path now in use.
int64_t mxfp4_fake_quantize_set_isa(int64_t isa) {
  g_isa_override.store(static_cast<int>(isa));
  return current_isa();
}

}  // namespace

namespace tme_cpu {

void rotate_fake_quantize_rows(const float* x, float* out, int64_t rows, int64_t K, int64_t block_size, const at::Tensor* rotation,
                               c10::string_view scale_rule) {
  const int rule = check_quantize_args("mxfp4_gemv", K, rotation, block_size, scale_rule);
  const auto rc = rotation != nullptr ? rotation->contiguous() : at::Tensor();
  const int isa = ::current_isa();
  const float* r = rotation != nullptr ? rc.data_ptr<float>() : nullptr;
  const int64_t rb = rotation != nullptr ? rc.size(0) : 0;
  // Rows split across ATen's threads as in the operator (prompts; one row runs inline).
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / (K * std::max<int64_t>(rb, 16) / 16)), [&](int64_t r0, int64_t r1) {
    quantize_rows(isa, x, out, r0, r1, K, block_size, rule, r, rb);
  });
}

}  // namespace tme_cpu

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) { m.def("_mxfp4_fake_quantize_set_isa(int isa) -> int", &mxfp4_fake_quantize_set_isa); }

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) {
  m.impl("mxfp4_fake_quantize", &mxfp4_fake_quantize);
  m.impl("mxfp4_rotate_fake_quantize", &mxfp4_rotate_fake_quantize);
}
