// Fused MXFP4 weight-only GEMV for CPUs: y[m, n] = sum_k x[m, k] * (E2M1(code[n, k]) * scale[n, k / B] * mult)
// (+ bias[n]), decoding the packed weight inside the reduction (no dense weight is ever written).
//
// The CPU kernel of torchao_mx_ext::mxfp4_gemv. The operator itself (schema, fake kernel, and a
// pure-torch CompositeExplicitAutograd fallback used while this library is not loaded) is defined
// in Python: torchao_mx_ext/kernels/cpu_mxfp4_gemv.py. Layout, as written by torchao_mx_ext.mx:
//   qdata [N, K/2] uint8, element 2i in the low nibble of byte i; scale [N, K/B] uint8 E8M0
//   (byte b = 2^(b-127), 255 = NaN); B (block_size) a multiple of 32 here.
// Numbers: each decoded weight is fl32(E2M1 * fl32(2^e * fl32(mult))), exactly the value
// mxfp4_dequantize produces; x is read in its own dtype (the caller rounds it to the GEMM dtype) and
// widened to float32; products and sums are float32 (summation order differs from a BLAS GEMM),
// bias is added in float32, and the result is rounded once to out_dtype. The AVX-512 BF16 path
// (bf16 x only) multiplies each block's partial sums by the block scale instead of the weights
// (the same products for power-of-two scales; with fp_quant's 4/3 a float32 rounding apart), and
// vdpbf16ps reads bf16 subnormals as zero.
//
// Code paths, chosen at run time: integer dot products (below; AVX-512 VNNI or AVX2), AVX-512 BF16
// (bf16 x: vdpbf16ps, 32 multiply-adds per instruction), AVX-512F (16-entry table lookup with vpermps),
// AVX2+FMA (8-entry magnitude lookup + sign bit), scalar.
//
// Integer dot products (AVX2 and wider, multiplier 1): where every 32-element chunk of x is v * 2^e with
// integers |v| < 32 and one e per chunk -- true of MX fake-quantized activations (E2M1 values on a
// power-of-two block scale, the W4A4 decode step), and checked on every call -- a chunk's dot product
// with 2 * E2M1 weights is exact in int32, as in the integer GEMM (mxfp4_mm.cpp, llama.cpp's Q8 x
// MXFP4 dots): y = sum_c 2^(e_c + e_w(c) - 128) * sum_{k in c} v_k (2 q_k). vpmaddubsw needs one
// unsigned operand, so the weight is looked up as 2q + 12 in [0, 24] and 12 * sum v is subtracted
// per 4-lane group (exact in int32); two chunks share one 256-bit register. The products are
// exact (no decoded weight is rounded), so results equal the float path's up to float32 summation
// order; 4x the float path's multiply-adds per second on Zen 3 (benchmarks/gemv_bench.py). With
// AVX-512 VNNI, four chunks per step and vpdpbusd (multiply, pair sums and accumulation in one). Inputs
// that are not of that form (bf16 / float activations of weight-only linears) take the float path.
//
// Input transform (optional arguments rotation, act_scale_rule): x is first replaced by Q_a(x R) in
// float32 by the quantizer kernel's own row function (mxfp4_fake_quantize.h), so a W4A4 decode-step
// linear is one operator call: Inductor's wrapper spends a few microseconds per extern call, and a
// decoder step makes hundreds.
//
// The paths follow ATen's own CPU capability, so ATEN_CPU_CAPABILITY=avx2/default selects the
// narrower ones as it does for ATen's kernels. Up to 4 rows of x share one decode of a weight chunk;
// output rows are split across ATen's threads (at least kGrainBytes of weight each).

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_ops.h"
#include "mxfp4_codes.h"
#include "mxfp4_fake_quantize.h"
#include "mxfp4_panels.h"

namespace {

// E2M1 code -> value (OCP MX v1.0): sign << 3 | index, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}.
constexpr float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// Calls that took the integer path (test hook: which path ran is not visible in the results' bits).
std::atomic<int64_t> g_integer_calls{0};

using tme_cpu::kIsaAvx2;
using tme_cpu::kIsaAvx512;
using tme_cpu::kIsaAvx512Bf16;
using tme_cpu::kIsaScalar;
std::atomic<int> g_isa_override{-1};

int current_isa() { return tme_cpu::current_isa(g_isa_override, kIsaAvx512Bf16); }

// fl32(2^(b-127) * fl32(mult)) for every E8M0 byte; 255 is NaN.
void fill_scale_table(float* tab, double multiplier) {
  const float mult = static_cast<float>(multiplier);
  for (int b = 0; b < 255; ++b) {
    float s;
    if (b == 0) {
      s = std::ldexp(1.0f, -127);  // the one subnormal
    } else {
      const uint32_t bits = static_cast<uint32_t>(b) << 23;
      std::memcpy(&s, &bits, sizeof(s));
    }
    tab[b] = mult == 1.0f ? s : s * mult;
  }
  tab[255] = std::numeric_limits<float>::quiet_NaN();
}

struct Problem {
  const uint8_t* q;   // [N, K/2]
  const uint8_t* sc;  // [N, K/B]
  const float* xd;    // [M, K] float32, each 32-chunk reordered: 16 even elements, then 16 odd ones
  const uint16_t* xb; // or [M, Kp] bf16 bits (bf16 path, Kp = K rounded up to 64), see rows_avx512bf16
  int64_t Kp;
  const float* tab;   // [256] block scales
  // The integer path (nullptr otherwise), per group of G chunks c = G j .. G j + G - 1 (G = 2 on AVX2,
  // 4 with AVX-512 VNNI), see int_activations:
  const int8_t* xi;   // [M, P * 32G] v: even elements of each chunk of the group (16 each), then odd ones
  const int32_t* xcorr; // [M, P * 4G] 12 * sum of the 8 v in each 32-bit lane of the products
  const float* xsc;   // [M, P * 4G] 2^e of chunk G j + h in lanes 4h .. 4h + 3
  int64_t P;          // chunk groups, ceil(K / 32G)
  int G;
  const float* bias;  // [N] or nullptr
  void* out;          // [M, N] of out_t
  at::ScalarType out_t;
  int64_t M, N, K, B;
  bool plain_scales = false;  // every E8M0 byte avoids 0 and 255 (B = 32, VNNI path): scales from the bits
};

inline void store(const Problem& p, int64_t m, int64_t n, float v) {
  if (p.bias) v += p.bias[n];
  tme_cpu::store_as(p.out, p.out_t, m * p.N + n, v);
}

#ifdef TME_X86_SIMD
// store for the four outputs n..n+3 of row m at once (the decode tiles' epilogue).
__attribute__((target("avx2"))) inline void store4(const Problem& p, int64_t m, int64_t n, __m128 sums) {
  if (p.bias) sums = _mm_add_ps(sums, _mm_loadu_ps(p.bias + n));
  if (p.out_t == at::kBFloat16) {  // c10's round to nearest even (NaN -> 0x7FC0), four at a time
    const __m128i u = _mm_castps_si128(sums);
    __m128i r = _mm_add_epi32(u, _mm_add_epi32(_mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1)), _mm_set1_epi32(0x7FFF)));
    r = _mm_blendv_epi8(r, _mm_set1_epi32(0x7FC00000), _mm_castps_si128(_mm_cmpunord_ps(sums, sums)));
    const __m128i hi = _mm_srli_epi32(r, 16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p.out) + m * p.N + n), _mm_packus_epi32(hi, hi));
    return;
  }
  alignas(16) float t[4];
  _mm_store_ps(t, sums);
  tme_cpu::store4_as(p.out, p.out_t, m * p.N + n, t);
}
#endif

// ---------------------------------------------------------------------------------------------
// scalar

template <int MT>
void rows_scalar(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / p.B, cpb = p.B / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = p.q + n * (p.K / 2);
    const uint8_t* sr = p.sc + n * nb;
    float acc[MT] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const float s = p.tab[sr[b]];
      float lut[16];
      for (int i = 0; i < 16; ++i) lut[i] = kE2M1[i] * s;
      for (int64_t c = b * cpb; c < (b + 1) * cpb; ++c) {
        const uint8_t* qc = qr + c * 16;
        float wl[16], wh[16];
        for (int j = 0; j < 16; ++j) {
          wl[j] = lut[qc[j] & 15];
          wh[j] = lut[qc[j] >> 4];
        }
        for (int m = 0; m < MT; ++m) {
          const float* xc = p.xd + (m0 + m) * p.K + c * 32;
          float a = 0.0f;
          for (int j = 0; j < 16; ++j) a += wl[j] * xc[j] + wh[j] * xc[16 + j];
          acc[m] += a;
        }
      }
    }
    for (int m = 0; m < MT; ++m) store(p, m0 + m, n, acc[m]);
  }
}

#ifdef TME_X86_SIMD
// ---------------------------------------------------------------------------------------------
// AVX-512F: one 32-element chunk = 16 bytes -> 16 int32 lanes; vpermps picks from the 16-entry
// table (already multiplied by the block scale) by the low nibble, then by the high nibble.

template <int MT>
__attribute__((target("avx512f"))) void rows_avx512(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / p.B, cpb = p.B / 32;
  const __m512 lut = _mm512_loadu_ps(kE2M1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = p.q + n * (p.K / 2);
    const uint8_t* sr = p.sc + n * nb;
    __m512 acc_lo[MT], acc_hi[MT];
    for (int m = 0; m < MT; ++m) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 lut_s = _mm512_mul_ps(lut, _mm512_set1_ps(p.tab[sr[b]]));
      for (int64_t c = b * cpb; c < (b + 1) * cpb; ++c) {
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + c * 16)));
        const __m512 w_lo = _mm512_permutexvar_ps(codes, lut_s);  // uses bits 0..3 of each lane
        const __m512 w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut_s);
        for (int m = 0; m < MT; ++m) {
          const float* xc = p.xd + (m0 + m) * p.K + c * 32;
          acc_lo[m] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xc), acc_lo[m]);
          acc_hi[m] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xc + 16), acc_hi[m]);
        }
      }
    }
    for (int m = 0; m < MT; ++m) store(p, m0 + m, n, _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[m], acc_hi[m])));
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2+FMA: 8 bytes -> 8 int32 lanes; vpermps over the 8 scaled magnitudes, sign from bit 3.

__attribute__((target("avx2,fma"))) inline __m256 decode8(__m256i nibbles, __m256 mag_s) {
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(nibbles, _mm256_set1_epi32(8)), 28);
  return _mm256_xor_ps(_mm256_permutevar8x32_ps(mag_s, nibbles), _mm256_castsi256_ps(sign));
}

template <int MT>
__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = p.K / p.B, cpb = p.B / 32;
  const __m256 mag = _mm256_loadu_ps(kE2M1);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = p.q + n * (p.K / 2);
    const uint8_t* sr = p.sc + n * nb;
    __m256 acc_lo[MT], acc_hi[MT];
    for (int m = 0; m < MT; ++m) acc_lo[m] = acc_hi[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const __m256 mag_s = _mm256_mul_ps(mag, _mm256_set1_ps(p.tab[sr[b]]));
      for (int64_t c = b * cpb; c < (b + 1) * cpb; ++c) {
        for (int g = 0; g < 2; ++g) {
          const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + c * 16 + g * 8)));
          const __m256 w_lo = decode8(_mm256_and_si256(codes, low4), mag_s);
          const __m256 w_hi = decode8(_mm256_srli_epi32(codes, 4), mag_s);
          for (int m = 0; m < MT; ++m) {
            const float* xc = p.xd + (m0 + m) * p.K + c * 32 + g * 8;
            acc_lo[m] = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xc), acc_lo[m]);
            acc_hi[m] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xc + 16), acc_hi[m]);
          }
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      store(p, m0 + m, n, tme_cpu::hsum8(_mm256_add_ps(acc_lo[m], acc_hi[m])));
    }
  }
}

// The integer path streams the codes from memory at up to ~13 GB/s on Zen 3 (a decoder's weights exceed
// the caches); software prefetch about two 4-row tiles ahead keeps more lines in flight: +20% for a
// weight larger than L3 (ad hoc, one thread, 131072 x 576: 25.6 -> 30-32 G multiply-adds/s).
constexpr int64_t kPrefetchBytes = 2304;

// AVX2 integer path (see the top): MT rows of x against NR weight rows n..n+NR-1, one pair of chunks
// per step (G = 2). Lanes: vpmaddubsw pairs bytes 2i, 2i+1 into int16 lane i, vpmaddwd int16 lanes 2l, 2l+1
// into int32 lane l, so int32 lane l holds bytes 4l..4l+3 of the even and of the odd register:
// lanes 0-3 chunk c, lanes 4-7 chunk c + 1, each scaled by its own 2^(e_x + e_w - 128).
template <int MT, int NR, bool B32>
__attribute__((target("avx2,fma"))) void tile_avx2_int(const Problem& p, int64_t m0, int64_t n) {
  // B32 known at compile time: no 64-bit division per tile (tens of cycles against a few hundred of work)
  const int64_t nc = p.K / 32, nb = B32 ? nc : p.K / p.B, cpb = B32 ? 1 : p.B / 32, half_k = p.K / 2;
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tme_cpu::kE2M1x2Biased)));
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < p.P; ++j) {
    const int64_t c = 2 * j;
    const bool pair = c + 1 < nc;  // a last, unpaired chunk: zero activations (and scale) for c + 1
    if (j % 2 == 0) {  // one cache line of each row's codes per two pairs
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(p.q + (n + r) * half_k + c * 16 + kPrefetchBytes), _MM_HINT_T0);
    }
    for (int r = 0; r < NR; ++r) {
      const uint8_t* q = p.q + (n + r) * half_k + c * 16;
      const __m256i bytes = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))
                                 : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m256i w_even = _mm256_shuffle_epi8(lut, _mm256_and_si256(bytes, low4));  // 2q + 12
      const __m256i w_odd = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4));
      const uint8_t* sr = p.sc + (n + r) * nb;
      const float s0 = p.tab[sr[B32 ? c : c / cpb]];
      const float s1 = pair ? p.tab[sr[B32 ? c + 1 : (c + 1) / cpb]] : 0.0f;
      const __m256 sw = _mm256_blend_ps(_mm256_set1_ps(s0), _mm256_set1_ps(s1), 0xF0);
      for (int m = 0; m < MT; ++m) {
        const int8_t* a = p.xi + (m0 + m) * p.P * 64 + j * 64;  // G = 2
        const __m256i prod16 = _mm256_add_epi16(_mm256_maddubs_epi16(w_even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                                                _mm256_maddubs_epi16(w_odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32))));
        const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xcorr + (m0 + m) * p.P * 8 + j * 8));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(prod16, ones), corr));  // sum v (2q), exact
        const __m256 scale = _mm256_mul_ps(sw, _mm256_loadu_ps(p.xsc + (m0 + m) * p.P * 8 + j * 8));
        acc[m][r] = _mm256_fmadd_ps(dot, scale, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    if constexpr (NR == 4) {  // the decode tile: four outputs reduced and stored together
      store4(p, m0 + m, n, tme_cpu::hsum8x4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    } else {
      for (int r = 0; r < NR; ++r) store(p, m0 + m, n + r, tme_cpu::hsum8(acc[m][r]));
    }
  }
}

// Weight rows n0..n1-1 for x rows m0..m0+MT-1: several weight rows per step where few x rows leave
// registers free (independent accumulator chains, one load of each x pair for all of them).
template <int MT, bool B32>
void rows_avx2_int(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_avx2_int<MT, NR, B32>(p, m0, n);
  for (; n < n1; ++n) tile_avx2_int<MT, 1, B32>(p, m0, n);
}

#define TME_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma"

// 2^(b - 127) for the E8M0 bytes b of a group's `present` chunks, each over its chunk's 4 lanes, from the
// bits b << 23 (b in [1, 254]: the caller checks); chunks past the row's end read byte 0. The bytes are
// broadcast to every dword, vpshufb puts byte h in the top byte of lane group h's dwords, and one shift
// moves it to the exponent field.
__attribute__((target(TME_VNNI_TARGET))) inline __m512 quad_scales_from_bits(const uint8_t* s, int64_t present) {
  const __m512i to_top = _mm512_set_epi32(0x03808080, 0x03808080, 0x03808080, 0x03808080, 0x02808080, 0x02808080, 0x02808080, 0x02808080,
                                          0x01808080, 0x01808080, 0x01808080, 0x01808080, 0x00808080, 0x00808080, 0x00808080,
                                          0x00808080);  // 128-bit lane h: byte h to bits 24-31 of each dword
  __m512i b4;
  if (present == 4) {
    uint32_t bytes;
    std::memcpy(&bytes, s, 4);
    b4 = _mm512_set1_epi32(static_cast<int>(bytes));
  } else {
    b4 = _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << present) - 1), s));
  }
  return _mm512_castsi512_ps(_mm512_srli_epi32(_mm512_shuffle_epi8(b4, to_top), 1));
}

// Whether E8M0 bytes s[0 .. n) avoid 0 and 255 (their scale is then the plain exponent bits).
__attribute__((target(TME_VNNI_TARGET))) inline bool plain_scale_bytes(const uint8_t* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) {
    const __mmask64 valid = n - i >= 64 ? ~__mmask64{0} : (__mmask64{1} << (n - i)) - 1;
    const __m512i b = _mm512_maskz_loadu_epi8(valid, s + i);
    const __mmask64 special = _mm512_cmpeq_epi8_mask(b, _mm512_setzero_si512()) | _mm512_cmpeq_epi8_mask(b, _mm512_set1_epi8(-1));
    if (special & valid) return false;
  }
  return true;
}

// AVX-512 VNNI integer path: as tile_avx2_int, four chunks per step (G = 4, one 64-byte line of each
// weight row's codes), vpdpbusd for the multiply and the int32 sums in one instruction, starting from
// -12 * sum v (the bias's share) instead of subtracting it after. int32 lane l holds bytes 4l..4l+3 of
// the even and of the odd register: lanes 4h..4h+3 are chunk 4j + h. The codes are looked up with
// vpermb (VBMI), which reads 6 index bits: the 16-entry table repeated 4 times makes the bits above the
// nibble irrelevant, so neither nibble needs masking.
template <int MT, int NR, bool B32>
__attribute__((target(TME_VNNI_TARGET))) void tile_vnni_int(const Problem& p, int64_t m0, int64_t n) {
  // B32 known at compile time: no 64-bit division per tile (tens of cycles against a few hundred of work)
  const int64_t nc = p.K / 32, nb = B32 ? nc : p.K / p.B, cpb = B32 ? 1 : p.B / 32, half_k = p.K / 2;
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tme_cpu::kE2M1x2Biased)));
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const bool plain = B32 && p.plain_scales;  // checked once per call (run_gemv), not per tile
  __m512 acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < p.P; ++j) {
    const int64_t c = 4 * j, present = std::min<int64_t>(4, nc - c);  // a last group may hold fewer chunks
    const __mmask64 code_mask = present == 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * present)) - 1;
    __m512i a_even[MT], a_odd[MT], bias_share[MT];
    __m512 xs[MT];
    for (int m = 0; m < MT; ++m) {
      const int8_t* a = p.xi + (m0 + m) * p.P * 128 + j * 128;
      a_even[m] = _mm512_loadu_si512(a);
      a_odd[m] = _mm512_loadu_si512(a + 64);
      bias_share[m] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(p.xcorr + (m0 + m) * p.P * 16 + j * 16));
      xs[m] = _mm512_loadu_ps(p.xsc + (m0 + m) * p.P * 16 + j * 16);
    }
    for (int r = 0; r < NR; ++r) {
      const uint8_t* q = p.q + (n + r) * half_k + c * 16;
      _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchBytes), _MM_HINT_T0);
      const __m512i bytes = present == 4 ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8(code_mask, q);
      const __m512i w_even = _mm512_permutexvar_epi8(bytes, lut);  // 2q + 12
      const __m512i w_odd = _mm512_permutexvar_epi8(_mm512_srli_epi16(bytes, 4), lut);
      const uint8_t* sr = p.sc + (n + r) * nb;
      __m512 sw;
      if (plain) {
        sw = quad_scales_from_bits(sr + c, present);
      } else {
        alignas(16) float s4[4];
        for (int h = 0; h < 4; ++h) s4[h] = h < present ? p.tab[sr[B32 ? c + h : (c + h) / cpb]] : 0.0f;
        sw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_load_ps(s4)));
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(bias_share[m], w_even, a_even[m]), w_odd, a_odd[m]);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sw, xs[m]), acc[m][r]);  // exact dot, exact scale
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    if constexpr (NR == 4) {  // four outputs reduced and stored together
      store4(p, m0 + m, n, tme_cpu::hsum16x4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    } else {
      for (int r = 0; r < NR; ++r) store(p, m0 + m, n + r, _mm512_reduce_add_ps(acc[m][r]));
    }
  }
}

// The VNNI path's instructions: AVX-512 VNNI and VBMI (Ice Lake, Sapphire Rapids, Zen 4; without VBMI,
// e.g. Cascade Lake, the AVX2 integer path runs).
bool has_vnni_vbmi() {
  static const bool ok = tme_cpu::has_avx512_vnni() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

template <int MT, bool B32>
void rows_vnni_int(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = MT <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_vnni_int<MT, NR, B32>(p, m0, n);
  for (; n < n1; ++n) tile_vnni_int<MT, 1, B32>(p, m0, n);
}

#ifdef TME_AVX512_BF16
// ---------------------------------------------------------------------------------------------
// AVX-512 BF16 (bf16 inputs only): E2M1 values are exact in bf16, so vdpbf16ps multiplies 32 codes
// by 32 bf16 activations per instruction (exact products, float32 sums); the block scale follows
// with one FMA. Two 32-element chunks per step: 32 bytes -> 32 int16 lanes; vpermw picks from the
// table by the low nibble (it reads 5 index bits, hence the table twice), then by the high one.
// x layout per chunk pair (c, c+1): even(c), even(c+1), odd(c), odd(c+1), 16 values each; a last
// unpaired chunk has zeros for c+1.

alignas(64) constexpr uint16_t kE2M1Bf16x2[32] = {
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

template <int MT, bool B32>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rows_avx512bf16(const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nc = p.K / 32, cpb = p.B / 32, nb = p.K / p.B;
  const __m512i lut = _mm512_load_si512(kE2M1Bf16x2);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = p.q + n * (p.K / 2);
    const uint8_t* sr = p.sc + n * nb;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; c += 2) {
      const bool pair = c + 1 < nc;
      const __m256i bytes = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + c * 16))
                                 : _mm256_maskz_loadu_epi8(0xFFFF, qr + c * 16);
      const __m512i codes = _mm512_cvtepu8_epi16(bytes);
      const __m512i w_lo = _mm512_permutexvar_epi16(codes, lut);
      const __m512i w_hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), lut);
      const float s0 = p.tab[sr[B32 ? c : c / cpb]];
      const float s1 = pair ? p.tab[sr[B32 ? c + 1 : (c + 1) / cpb]] : 0.0f;
      const __m512 sv = _mm512_mask_broadcastss_ps(_mm512_set1_ps(s0), 0xFF00, _mm_set_ss(s1));
      for (int m = 0; m < MT; ++m) {
        const uint16_t* xc = p.xb + (m0 + m) * p.Kp + c * 32;
        __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w_lo, (__m512bh)_mm512_loadu_si512(xc));
        t = _mm512_dpbf16_ps(t, (__m512bh)w_hi, (__m512bh)_mm512_loadu_si512(xc + 32));
        acc[m] = _mm512_fmadd_ps(t, sv, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) store(p, m0 + m, n, _mm512_reduce_add_ps(acc[m]));
  }
}

// One x row (decode), NR weight rows at a time: NR independent accumulator chains and one load of
// each x chunk pair for NR rows. Each output's products and sums are those of rows_avx512bf16<1>
// (same order), so the same bits. 5-9% faster than one row at a time on SmolLM2's decode shapes
// (one thread, 192..1536 x 576 and 576 x 1536, ad hoc).
template <int NR, bool B32>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void rows_avx512bf16_one_x(const Problem& p, int64_t m,
                                                                                                int64_t n) {
  const int64_t nc = p.K / 32, cpb = p.B / 32, nb = p.K / p.B, half_k = p.K / 2;
  const __m512i lut = _mm512_load_si512(kE2M1Bf16x2);
  const uint16_t* xr = p.xb + m * p.Kp;
  const uint8_t* qr = p.q + n * half_k;
  const uint8_t* sr = p.sc + n * nb;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; c += 2) {
    const bool pair = c + 1 < nc;
    const __m512bh x_lo = (__m512bh)_mm512_loadu_si512(xr + c * 32);
    const __m512bh x_hi = (__m512bh)_mm512_loadu_si512(xr + c * 32 + 32);
    const int64_t b0 = B32 ? c : c / cpb, b1 = B32 ? c + 1 : (c + 1) / cpb;
    for (int r = 0; r < NR; ++r) {
      const uint8_t* q = qr + r * half_k + c * 16;
      const __m256i bytes = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)) : _mm256_maskz_loadu_epi8(0xFFFF, q);
      const __m512i codes = _mm512_cvtepu8_epi16(bytes);
      const __m512i w_lo = _mm512_permutexvar_epi16(codes, lut);
      const __m512i w_hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(codes, 4), lut);
      const float s0 = p.tab[sr[r * nb + b0]];
      const float s1 = pair ? p.tab[sr[r * nb + b1]] : 0.0f;
      const __m512 sv = _mm512_mask_broadcastss_ps(_mm512_set1_ps(s0), 0xFF00, _mm_set_ss(s1));
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w_lo, x_lo);
      t = _mm512_dpbf16_ps(t, (__m512bh)w_hi, x_hi);
      acc[r] = _mm512_fmadd_ps(t, sv, acc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) store(p, m, n + r, _mm512_reduce_add_ps(acc[r]));
}

template <bool B32>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rows_avx512bf16_decode(const Problem& p, int64_t m, int64_t n0,
                                                                                          int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows_avx512bf16_one_x<4, B32>(p, m, n);
  for (; n < n1; ++n) rows_avx512bf16_one_x<1, B32>(p, m, n);
}
#endif  // TME_AVX512_BF16
#endif  // TME_X86_SIMD

#ifdef TME_X86_SIMD
// One 32-element chunk of the integer path's input (see int_activations): false if it is not v * 2^e
// with integers |v| < 32. The even elements' v go to even[0..16), the odd ones' to odd[0..16);
// corr[0..4) and scale[0..4) are the chunk's four 32-bit lanes.
__attribute__((target("avx2,fma"))) bool int_chunk_avx2(const float* x, int8_t* even_dst, int8_t* odd_dst, int32_t* corr, float* scale) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256 v[4];
  __m256i amax = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_epi32(amax, _mm256_and_si256(_mm256_castps_si256(v[i]), abs_mask));  // |x| bits: ordered as |x|
  }
  __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(amax), _mm256_extracti128_si256(amax, 1));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
  const uint32_t amax_bits = static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
  if (amax_bits >= 0x7F800000u) return false;  // inf or NaN
  if (amax_bits == 0) {  // all zeros: v = 0, any scale
    std::memset(even_dst, 0, 16);
    std::memset(odd_dst, 0, 16);
    for (int l = 0; l < 4; ++l) corr[l] = 0, scale[l] = 1.0f;
    return true;
  }
  // e = floor(log2 max|x|) - 4 from the exponent bits; 2^-e and the scale 2^(e-1) must be normal floats.
  const int e = static_cast<int>(amax_bits >> 23) - 127 - 4;
  if ((amax_bits >> 23) == 0 || e - 1 < -126) return false;
  const __m256 inv = _mm256_castsi256_ps(_mm256_set1_epi32((127 - e) << 23));
  const __m256 pow_e = _mm256_castsi256_ps(_mm256_set1_epi32((127 + e) << 23));
  __m256i n[4];
  for (int i = 0; i < 4; ++i) {
    n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to nearest
    // Exact iff n * 2^e gives x back (n * 2^e is exact: |n| < 32, 2^e normal).
    const __m256 back = _mm256_mul_ps(_mm256_cvtepi32_ps(n[i]), pow_e);
    if (_mm256_movemask_ps(_mm256_cmp_ps(back, v[i], _CMP_EQ_OQ)) != 0xFF) return false;
  }
  // int32 -> int8 in element order: the two packs interleave 4-element groups, one vpermd restores them.
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3])), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // Even elements, then odd ones, per 128-bit lane; then the lanes' halves regrouped.
  const __m256i split = _mm256_shuffle_epi8(
      bytes, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m256i eo = _mm256_permute4x64_epi64(split, _MM_SHUFFLE(3, 1, 2, 0));  // evens (16), odds (16)
  const __m128i even = _mm256_castsi256_si128(eo), odd = _mm256_extracti128_si256(eo, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(even_dst), even);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(odd_dst), odd);
  // 12 * the sum of bytes 4l..4l+3 of both halves, per lane l: sign-extend, then pairwise sums.
  const __m256i sum16 = _mm256_add_epi16(_mm256_cvtepi8_epi16(even), _mm256_cvtepi8_epi16(odd));
  const __m256i sum32 = _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));  // 8 lanes: pairs of elements
  const __m128i pairs = _mm_hadd_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
  // hadd of lanes (a0..a3) and (b0..b3) gives a0+a1, a2+a3, b0+b1, b2+b3: groups 0..3 of 4 bytes.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(corr), _mm_mullo_epi32(pairs, _mm_set1_epi32(tme_cpu::kE2M1x2Bias)));
  _mm_storeu_ps(scale, _mm_castsi128_ps(_mm_set1_epi32((127 + e - 1) << 23)));  // 2^(e-1): the weights enter as 2q
  return true;
}
#endif  // TME_X86_SIMD

// Chunk c of row m of x [M, K] as float32: in place for float32 inputs, widened into buf otherwise.
template <typename scalar_t>
inline const float* chunk_f32(const scalar_t* x, int64_t K, int64_t m, int64_t c, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x + m * K + c * 32;
  } else {
    for (int k = 0; k < 32; ++k) buf[k] = static_cast<float>(x[m * K + c * 32 + k]);
    return buf;
  }
}

// The integer path's operands for x [M, K] (any floating dtype; AVX2), in groups of G chunks: for every
// 32-element chunk, with e = floor(log2 max |x|) - 4, v = x * 2^-e, which must be integers (then |v| < 32)
// for every chunk of every row -- else false and the float path runs. The chunk's scale is 2^(e-1) (the
// weights enter as 2q); it and 2^-e must be normal float32 (e - 1 >= -126: chunks below ~2^-120 take the
// float path); an all-zero chunk has v = 0 and scale 1; chunks past K (in the last group) have v = 0 and
// scale 0. Layout as in Problem (xi, xcorr, xsc).
template <typename scalar_t>
bool int_activations(const scalar_t* x, int64_t M, int64_t K, int G, int8_t* xi, int32_t* xcorr, float* xsc) {
#ifdef TME_X86_SIMD
  const int64_t nc = K / 32, P = (nc + G - 1) / G, row_bytes = P * 32 * G, row_lanes = P * 4 * G;
  for (int64_t m = 0; m < M; ++m) {  // the missing chunks of each row's last group
    for (int64_t c = nc; c < P * G; ++c) {
      const int64_t j = c / G, h = c % G;
      std::memset(xi + m * row_bytes + j * 32 * G + 16 * h, 0, 16);
      std::memset(xi + m * row_bytes + j * 32 * G + 16 * G + 16 * h, 0, 16);
      for (int l = 0; l < 4; ++l) xcorr[m * row_lanes + j * 4 * G + 4 * h + l] = 0, xsc[m * row_lanes + j * 4 * G + 4 * h + l] = 0.0f;
    }
  }
  float buf[32];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < nc; ++c) {
      const float* v = chunk_f32(x, K, m, c, buf);
      // Chunk c goes to group j = c / G, place h = c % G: its even elements at bytes 16h.., odd at 16G + 16h..
      const int64_t j = c / G, h = c % G;
      int8_t* group = xi + m * row_bytes + j * 32 * G;
      if (!int_chunk_avx2(v, group + 16 * h, group + 16 * G + 16 * h, xcorr + m * row_lanes + j * 4 * G + 4 * h,
                          xsc + m * row_lanes + j * 4 * G + 4 * h))
        return false;
    }
  }
  return true;
#else
  return false;
#endif
}

// More rows than this take the panel GEMM where the integer path runs on AVX-512 VNNI: the weight is
// repacked once per call instead of decoded again for every 4 rows (mxfp4_panels.h). Measured on a Zen 4
// core (benchmarks/w4a4_gemm_bench.py, SmolLM2 shapes): 0.65-1.37x the 4-row tiles at 16 rows, 1.3-1.9x at 64.
constexpr int64_t kPanelMinRows = 16;

// The panel GEMM's activation operand from x [M, K] (see int_activations: the same test and the same
// v, e per chunk): v in chunk order (the 16 even elements, then the 16 odd ones), -12 * the chunk's sum
// of v, and its scale 2^(e-1) (the weights enter as 2q). False if a chunk is not of that form.
template <typename scalar_t>
bool panel_activations(const scalar_t* x, int64_t M, int64_t K, int8_t* a, int32_t* corr, float* scale) {
#ifdef TME_X86_SIMD
  const int64_t nc = K / 32;
  std::atomic<bool> ok{true};
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / K), [&](int64_t m0, int64_t m1) {
    float buf[32];
    for (int64_t m = m0; m < m1 && ok.load(std::memory_order_relaxed); ++m) {
      for (int64_t c = 0; c < nc; ++c) {
        const float* v = chunk_f32(x, K, m, c, buf);
        int32_t lane_corr[4];
        float lane_scale[4];
        int8_t* dst = a + m * K + c * 32;
        if (!int_chunk_avx2(v, dst, dst + 16, lane_corr, lane_scale)) {
          ok.store(false, std::memory_order_relaxed);
          return;
        }
        corr[m * nc + c] = -(lane_corr[0] + lane_corr[1] + lane_corr[2] + lane_corr[3]);
        scale[m * nc + c] = lane_scale[0];
      }
    }
  });
  return ok.load();
#else
  return false;
#endif
}

// Rows m0..m0+MT-1 of the output, weight rows n0..n1-1.
template <int MT>
void rows(int isa, const Problem& p, int64_t m0, int64_t n0, int64_t n1) {
#ifdef TME_AVX512_BF16
  if (p.xb && MT == 1) return p.B == 32 ? rows_avx512bf16_decode<true>(p, m0, n0, n1) : rows_avx512bf16_decode<false>(p, m0, n0, n1);
  if (p.xb) return p.B == 32 ? rows_avx512bf16<MT, true>(p, m0, n0, n1) : rows_avx512bf16<MT, false>(p, m0, n0, n1);
#endif
#ifdef TME_X86_SIMD
  if (p.xi && p.G == 4) return p.B == 32 ? rows_vnni_int<MT, true>(p, m0, n0, n1) : rows_vnni_int<MT, false>(p, m0, n0, n1);
  if (p.xi) return p.B == 32 ? rows_avx2_int<MT, true>(p, m0, n0, n1) : rows_avx2_int<MT, false>(p, m0, n0, n1);
  if (isa >= kIsaAvx512) return rows_avx512<MT>(p, m0, n0, n1);
  if (isa == kIsaAvx2) return rows_avx2<MT>(p, m0, n0, n1);
#endif
  rows_scalar<MT>(p, m0, n0, n1);
}

constexpr int64_t kRowBlock = 16;  // weight rows visited by every tile of x rows while in L1
// Decoded-weight bytes (times row tiles) per parallel task, so that small GEMVs stay on one thread.
// Chosen, not tuned: on the busy 2-core machine this was written on, 2-thread timings were dominated
// by scheduler stalls.
constexpr int64_t kGrainBytes = 64 * 1024;

// The input operand of one or more GEMVs of width K, laid out for the path that runs (see Problem).
// Scratch memory is plain heap vectors, not tensors: a decode step prepares a few hundred inputs, and
// each at::empty / .to() is a dispatcher round trip (~0.5 ms a SmolLM2-135M step, profiled).
struct GemvInput {
  GemvInput() = default;
  GemvInput(GemvInput&&) = default;  // moves keep the vectors' buffers, which the pointers point into
  GemvInput& operator=(GemvInput&&) = default;
  GemvInput(const GemvInput&) = delete;
  std::vector<float> xd_storage;
  std::vector<uint16_t> xb_storage;
  std::vector<uint8_t> int_storage;
  bool panels = false;  // the integer path as a panel GEMM: xi [M, K], xcorr and xsc [M, K/32]
  const float* xd = nullptr;
  const uint16_t* xb = nullptr;
  const int8_t* xi = nullptr;
  const int32_t* xcorr = nullptr;
  const float* xsc = nullptr;
  int64_t M = 0, K = 0, P = 0, Kp = 0;  // P: chunk groups of the integer path
  int G = 2;  // chunks per group of the integer path
};

// x [M, K] (any floating dtype, contiguous or not), transformed first where asked (rotation and/or
// act_scale_rule: x <- Q_a(x R) in float32, the bits of mxfp4_rotate_fake_quantize).
GemvInput prepare_input(const at::Tensor& x, int64_t M, int64_t K, int64_t block_size, double multiplier, int isa,
                        const at::Tensor* rotation, c10::optional<c10::string_view> act_scale_rule) {
  GemvInput in;
  in.M = M;
  in.K = K;
  const at::Tensor xc = x.contiguous();
  std::vector<float> transformed;
  if (rotation != nullptr || act_scale_rule.has_value()) {
    std::vector<float> widened;
    const float* src = nullptr;
    if (xc.scalar_type() == at::kFloat) {
      src = xc.data_ptr<float>();
    } else {
      widened.resize(M * K);
#ifdef TME_X86_SIMD
      if (xc.scalar_type() == at::kBFloat16 && isa >= kIsaAvx2) {  // prompts: 8 at a time (bf16 is float32's top half)
        tme_cpu::widen_bf16(static_cast<const uint16_t*>(xc.data_ptr()), widened.data(), M * K);
      } else
#endif
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "mxfp4_gemv_widen", [&] {
        const scalar_t* w = xc.data_ptr<scalar_t>();
        for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(w[i]);
      });
      src = widened.data();
    }
    transformed.resize(M * K);
    tme_cpu::rotate_fake_quantize_rows(src, transformed.data(), M, K, block_size, rotation, act_scale_rule.value_or("none"));
  }
  // The input the paths below read: the transformed float32 rows, or x in its own dtype.
  const at::ScalarType x_t = transformed.empty() ? xc.scalar_type() : at::kFloat;
  const void* x_data = transformed.empty() ? xc.data_ptr() : static_cast<const void*>(transformed.data());
  const bool bf16_path = isa == kIsaAvx512Bf16 && x_t == at::kBFloat16;
  const int64_t nc = K / 32, Kp = (nc + 1) / 2 * 64;  // the bf16 path's width, padded to chunk pairs
  in.Kp = Kp;
  // The integer path where x allows it (AVX2 and wider: on a Zen 4 core it beats the AVX-512 BF16 dot
  // path on the same input) and plain E8M0 scales (fp_quant's multiplier makes decoded weights inexact
  // products).
  // The integer paths' operand in in.int_storage: v (v_bytes int8), then corrections and scales (lanes
  // 32-bit words each), filled by fill(x, v, corr, scale); released if x is not of the integer form.
  auto integer_operand = [&](int64_t v_bytes, int64_t lanes, auto&& fill) {
    in.int_storage.resize(v_bytes + lanes * 8);
    int8_t* v = reinterpret_cast<int8_t*>(in.int_storage.data());
    int32_t* corr = reinterpret_cast<int32_t*>(v + v_bytes);
    float* sc = reinterpret_cast<float*>(corr + lanes);
    bool ok = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t, "mxfp4_gemv_int", [&] {
      ok = fill(static_cast<const scalar_t*>(x_data), v, corr, sc);
    });
    if (!ok) {
      in.int_storage = {};
      return false;
    }
    g_integer_calls.fetch_add(1, std::memory_order_relaxed);
    in.xi = v;
    in.xcorr = corr;
    in.xsc = sc;
    return true;
  };
  if (isa >= kIsaAvx512 && multiplier == 1.0 && M > kPanelMinRows && tme_cpu::has_avx512_vnni() &&
      integer_operand(M * K, M * nc, [&](const auto* xs, int8_t* v, int32_t* corr, float* sc) {
        return panel_activations(xs, M, K, v, corr, sc);
      })) {
    in.panels = true;
    return in;
  }
  if (isa >= kIsaAvx2 && multiplier == 1.0) {
    const int G = isa >= kIsaAvx512 && has_vnni_vbmi() ? 4 : 2;  // chunks per step of the kernel
    const int64_t groups = (nc + G - 1) / G;
    if (integer_operand(M * groups * 32 * G, M * groups * 4 * G, [&](const auto* xs, int8_t* v, int32_t* corr, float* sc) {
          return int_activations(xs, M, K, G, v, corr, sc);
        })) {
      in.P = groups;
      in.G = G;
      return in;
    }
  }
  if (bf16_path) {
    // bf16 bits, per chunk pair: even(c), even(c+1), odd(c), odd(c+1); zeros for a missing c+1.
    in.xb_storage.resize(M * Kp);
    const uint16_t* src = static_cast<const uint16_t*>(x_data);
    uint16_t* dst = in.xb_storage.data();
    for (int64_t m = 0; m < M; ++m) {
      if (nc % 2) {  // the missing chunk of the last pair
        uint16_t* tail = dst + m * Kp + (nc / 2) * 64;
        std::memset(tail + 16, 0, 16 * sizeof(uint16_t));
        std::memset(tail + 48, 0, 16 * sizeof(uint16_t));
      }
      for (int64_t c = 0; c < nc; ++c) {
        const uint16_t* s = src + m * K + c * 32;
        uint16_t* d = dst + m * Kp + (c / 2) * 64 + (c % 2) * 16;
        for (int j = 0; j < 16; ++j) {
          d[j] = s[2 * j];
          d[32 + j] = s[2 * j + 1];
        }
      }
    }
    in.xb = dst;
    return in;
  }
  // float32, each 32-chunk reordered (even elements, then odd) to match the nibble order.
  in.xd_storage.resize(M * K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t, "mxfp4_gemv_x", [&] {
    const scalar_t* src = static_cast<const scalar_t*>(x_data);
    float* dst = in.xd_storage.data();
    for (int64_t i = 0; i < M * K; i += 32) {
      for (int j = 0; j < 16; ++j) {
        dst[i + j] = static_cast<float>(src[i + 2 * j]);
        dst[i + 16 + j] = static_cast<float>(src[i + 2 * j + 1]);
      }
    }
  });
  in.xd = in.xd_storage.data();
  return in;
}

// Checks one weight (and bias) against x; returns N.
int64_t check_weight(const char* op, const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale, int64_t block_size,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qdata.device().is_cpu() && scale.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kByte, op, ": qdata must be a 2-D uint8 tensor");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kByte, op, ": scale must be a 2-D uint8 tensor");
  const int64_t N = qdata.size(0), K = qdata.size(1) * 2;
  TORCH_CHECK(K > 0, op, ": the weight has no columns");
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(K % block_size == 0 && scale.size(0) == N && scale.size(1) == K / block_size,
              op, ": scale shape ", scale.sizes(), " does not match qdata ", qdata.sizes(), " in blocks of ", block_size);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(), op, ": bias must be a CPU [N] tensor");
  }
  return N;
}

void check_input(const char* op, const at::Tensor& x, int64_t block_size, at::ScalarType out_t) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(block_size > 0 && block_size % 32 == 0, op, ": block_size must be a multiple of 32, got ", block_size);
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor");
  TORCH_CHECK(out_t == at::kFloat || out_t == at::kBFloat16 || out_t == at::kHalf, op,
              ": out_dtype must be float32, bfloat16 or float16");
}

// E8M0 byte -> block scale: the plain table once per process; fp_quant's multiplier into `storage`.
const float* scale_table(double multiplier, float* storage) {
  static const std::vector<float> kPlainTable = [] {
    std::vector<float> t(256);
    fill_scale_table(t.data(), 1.0);
    return t;
  }();
  if (multiplier == 1.0) return kPlainTable.data();
  fill_scale_table(storage, multiplier);
  return storage;
}

// out [M, N] = the prepared input against one weight (+ bias).
void run_gemv(const GemvInput& in, int isa, const at::Tensor& qdata, const at::Tensor& scale, int64_t block_size, const float* tab,
              const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const auto q = qdata.contiguous();
  const auto sc = scale.contiguous();
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const int64_t M = in.M, N = q.size(0), K = in.K;
#ifdef TME_X86_SIMD
  if (in.panels) {
    tme_cpu::panel_gemm({q.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), tab, in.xi, in.xcorr, in.xsc,
                         bias.has_value() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(), out.scalar_type(), M, N, K, block_size});
    return;
  }
#endif
  Problem p{q.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), in.xd, in.xb, in.Kp, tab, in.xi, in.xcorr, in.xsc, in.P, in.G,
            bias.has_value() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(), out.scalar_type(), M, N, K, block_size};
#ifdef TME_X86_SIMD
  if (in.xi != nullptr && in.G == 4 && block_size == 32) p.plain_scales = plain_scale_bytes(p.sc, N * (K / 32));
#endif
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, (K / 2) * ((M + tme_cpu::kGemvRowTile - 1) / tme_cpu::kGemvRowTile)));
  tme_cpu::for_each_gemv_tile(M, N, grain, kRowBlock, [&](auto mt, int64_t m0, int64_t n0, int64_t n1) {
    rows<decltype(mt)::value>(isa, p, m0, n0, n1);
  });
}

std::vector<int64_t> out_shape_of(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// Whether two optional rotation blocks are the same matrix (the same tensor, or equal bits).
bool same_rotation(const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b) {
  if (a.has_value() != b.has_value()) return false;
  if (!a.has_value() || a->is_same(*b)) return true;
  if (a->sizes() != b->sizes() || a->scalar_type() != b->scalar_type()) return false;
  const auto ac = a->contiguous(), bc = b->contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0;
}

// Test hook: force a narrower code path (0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 BF16 for bf16 x;
// -1 = best available).
// Returns the path now in use.
int64_t mxfp4_gemv_set_isa(int64_t isa) {
  g_isa_override.store(static_cast<int>(isa));
  return current_isa();
}

// Test hook: how many calls so far took the integer path.
int64_t mxfp4_gemv_integer_calls() { return g_integer_calls.load(); }

}  // namespace

namespace tme_ops {

at::Tensor mxfp4_gemv(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale, int64_t block_size,
                      double multiplier, const c10::optional<at::Tensor>& bias,
                      c10::optional<at::ScalarType> out_dtype, const c10::optional<at::Tensor>& rotation,
                      c10::optional<c10::string_view> act_scale_rule) {
  const at::ScalarType out_t = out_dtype.value_or(x.scalar_type());
  check_input("mxfp4_gemv", x, block_size, out_t);
  const int64_t N = check_weight("mxfp4_gemv", x, qdata, scale, block_size, bias), K = x.size(-1);
  auto out = at::empty(out_shape_of(x, N), x.options().dtype(out_t));
  const int64_t M = x.numel() / K;
  if (M == 0 || N == 0) return out;
  const int isa = current_isa();
  const GemvInput in = prepare_input(x, M, K, block_size, multiplier, isa, rotation.has_value() ? &*rotation : nullptr, act_scale_rule);
  float tab_storage[256];
  run_gemv(in, isa, qdata, scale, block_size, scale_table(multiplier, tab_storage), bias, out);
  return out;
}

void mxfp4_gemv_group_into(const at::Tensor& x, at::TensorList qdata, at::TensorList scale, int64_t block_size, double multiplier,
                           const c10::List<c10::optional<at::Tensor>>& bias, const c10::List<c10::optional<at::Tensor>>& rotation,
                           c10::optional<c10::string_view> act_scale_rule, at::TensorList outs) {
  const size_t n = qdata.size();
  TORCH_CHECK(n > 0 && scale.size() == n && bias.size() == n && rotation.size() == n && outs.size() == n,
              "mxfp4_gemv_group: qdata, scale, bias and rotation must be lists of the same, nonzero length");
  for (size_t i = 0; i < n; ++i) {
    const int64_t N = check_weight("mxfp4_gemv_group", x, qdata[i], scale[i], block_size, bias.get(i));
    TORCH_CHECK(outs[i].numel() == x.numel() / x.size(-1) * N && outs[i].is_contiguous(), "mxfp4_gemv_group: output ", i,
                " does not match x and the weight");
    check_input("mxfp4_gemv_group", x, block_size, outs[i].scalar_type());
  }
  const int64_t K = x.size(-1), M = x.numel() / K;
  if (M == 0) return;
  const int isa = current_isa();
  float tab_storage[256];
  const float* tab = scale_table(multiplier, tab_storage);
  std::vector<std::pair<c10::optional<at::Tensor>, GemvInput>> prepared;
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> rot = rotation.get(i);
    const GemvInput* in = nullptr;
    for (const auto& entry : prepared)
      if (same_rotation(entry.first, rot)) in = &entry.second;
    if (in == nullptr) {
      prepared.emplace_back(rot, prepare_input(x, M, K, block_size, multiplier, isa, rot.has_value() ? &*rot : nullptr, act_scale_rule));
      in = &prepared.back().second;
    }
    at::Tensor out = outs[i];
    if (out.numel() > 0) run_gemv(*in, isa, qdata[i], scale[i], block_size, tab, bias.get(i), out);
  }
}

// Several weights against one input (q/k/v, gate/up): mxfp4_gemv for each, in one call, with the input
// prepared (transformed, laid out) once per distinct rotation. Same results as separate calls.
std::vector<at::Tensor> mxfp4_gemv_group(const at::Tensor& x, at::TensorList qdata, at::TensorList scale, int64_t block_size,
                                         double multiplier, const c10::List<c10::optional<at::Tensor>>& bias,
                                         c10::optional<at::ScalarType> out_dtype,
                                         const c10::List<c10::optional<at::Tensor>>& rotation,
                                         c10::optional<c10::string_view> act_scale_rule) {
  TORCH_CHECK(!qdata.empty() && scale.size() == qdata.size(), "mxfp4_gemv_group: qdata, scale, bias and rotation must be lists of the same, nonzero length");
  const at::ScalarType out_t = out_dtype.value_or(x.scalar_type());
  check_input("mxfp4_gemv_group", x, block_size, out_t);
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < qdata.size(); ++i) {
    TORCH_CHECK(qdata[i].dim() == 2, "mxfp4_gemv_group: qdata must be a 2-D uint8 tensor");
    outs.push_back(at::empty(out_shape_of(x, qdata[i].size(0)), x.options().dtype(out_t)));
  }
  mxfp4_gemv_group_into(x, qdata, scale, block_size, multiplier, bias, rotation, act_scale_rule, outs);
  return outs;
}

}  // namespace tme_ops

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) {
  m.def("_mxfp4_gemv_set_isa(int isa) -> int", &mxfp4_gemv_set_isa);
  m.def("_mxfp4_gemv_integer_calls() -> int", &mxfp4_gemv_integer_calls);
}

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) {
  m.impl("mxfp4_gemv", &tme_ops::mxfp4_gemv);
  m.impl("mxfp4_gemv_group", &tme_ops::mxfp4_gemv_group);
}
