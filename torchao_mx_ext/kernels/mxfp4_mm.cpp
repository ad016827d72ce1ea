// Exact MXFP4 x MXFP4 GEMM for CPUs (W4A4), on integer dot products:
//   y[m, n] = sum_c 2^(ea[m, c] + ew[n, c] - 2) * sum_{k in chunk c} (2 qa[m, k]) * (2 qw[n, k])   (+ bias[n])
// where chunk c is the c-th run of 32 elements, ea / ew the E8M0 exponents of the blocks holding it
// and qa / qw the E2M1 values. 2 * E2M1 is an integer in [-12, 12], so each chunk's dot product is
// exact in int8 x int8 -> int32 (at most 32 * 144 in magnitude); the power-of-two block scale is
// applied once per chunk in float32 (exact while the product of the two scales stays a normal
// float32), and the chunks are summed in float32. Against the float emulation (dequantize both
// operands, float32 GEMM) every product is the same exact number: only the float32 summation order
// differs, and a result whose partial sums are all representable (one chunk, say) is bit-equal.
//
// The CPU kernel of torchao_mx_ext::mxfp4_mm. The operator (schema, fake kernel, pure-torch fallback)
// is defined in Python: torchao_mx_ext/kernels/cpu_mxfp4_mm.py. Layout, as written by torchao_mx_ext.mx:
//   a_qdata [M, K/2], w_qdata [N, K/2] uint8, element 2i in the low nibble of byte i;
//   a_scale [M, K/B], w_scale [N, K/B] uint8 E8M0 (byte b = 2^(b-127), 255 = NaN); B a multiple of 32.
// Plain E8M0 scales only: fp_quant's 4/3 element multiplier is not applied here (the caller keeps
// those weights on the emulation).
//
// Both operands are decoded chunk by chunk into the same order (the 16 low nibbles, then the 16 high
// ones: elements 0, 2, .., 30, 1, 3, .., 31), which a dot product does not see. Code paths:
// - AVX-512 VNNI, two chunks per 512-bit register: vpdpbusd multiplies unsigned by signed bytes and
//   sums each four into int32 in one instruction. The weight is decoded with an offset, w + 12 in
//   [0, 24] (the offset is in the decoding table, so it costs nothing), and the offset's share is
//   subtracted exactly by starting the accumulator at -12 * (sum of the same four activations), once
//   per activation row: sum (w + 12) a - 12 sum a = sum a w, all in int32.
// - AVX2 (llama.cpp's trick for signed x signed int8: vpsignb moves a's sign onto w, vpmaddubsw
//   multiplies |a| by it, vpmaddwd sums pairs into int32; no value exceeds int16).
// - scalar.
// The path follows ATen's CPU capability (ATEN_CPU_CAPABILITY=avx2 selects AVX2, default scalar).

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "mxfp4_codes.h"
#include "mxfp4_panels.h"

namespace {

// 2 * E2M1 values, and plus 12 (the AVX-512 VNNI path's unsigned operand): mxfp4_codes.h.
using tme_cpu::kE2M1x2;
using tme_cpu::kE2M1x2Bias;
using tme_cpu::kE2M1x2Biased;

using tme_cpu::kIsaAvx2;
using tme_cpu::kIsaAvx512;  // here: AVX-512 with VNNI
using tme_cpu::kIsaScalar;
std::atomic<int> g_isa_override{-1};

int current_isa() { return tme_cpu::current_isa(g_isa_override, tme_cpu::has_avx512_vnni() ? kIsaAvx512 : kIsaAvx2); }

// 2^(b - 128) for every E8M0 byte b (half the block scale: the two halves make up the 4 of
// 2 x 2 * E2M1); 255 is NaN. All are float32 values (2^-128 a subnormal).
struct HalfScaleTable {
  float v[256];
  HalfScaleTable() {
    for (int b = 0; b < 255; ++b) v[b] = std::ldexp(1.0f, b - 128);
    v[255] = std::numeric_limits<float>::quiet_NaN();
  }
};
const HalfScaleTable kHalfScale;

#ifdef TME_X86_SIMD
using tme_cpu::decode_chunk_avx2;

__attribute__((target("avx2"))) void decode_chunks_avx2(const uint8_t* q, int8_t* v, int64_t chunks, const int8_t* table) {
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
  const __m256i low4 = _mm256_set1_epi8(15);
  for (int64_t c = 0; c < chunks; ++c)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + c * 32), decode_chunk_avx2(q + c * 16, lut, low4));
}
#endif

// Decode rows [r0, r1) of packed codes [R, K/2] into int8 [R, K] (chunk order above, values from
// `table`) and their per-chunk half scales [R, K/32].
void decode_rows(int isa, const uint8_t* q, const uint8_t* sc, int64_t r0, int64_t r1, int64_t K, int64_t B,
                 int8_t* vals, float* scales, const int8_t* table = kE2M1x2) {
  const int64_t nc = K / 32, cpb = B / 32, nb = K / B;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * (K / 2);
    int8_t* vr = vals + r * K;
    for (int64_t b = 0; b < nb; ++b) {  // (no division per chunk: it would cost more than the lookups)
      const float s = kHalfScale.v[sc[r * nb + b]];
      for (int64_t c = b * cpb; c < (b + 1) * cpb; ++c) scales[r * nc + c] = s;
    }
#ifdef TME_X86_SIMD
    if (isa >= kIsaAvx2) {
      decode_chunks_avx2(qr, vr, nc, table);
      continue;
    }
#endif
    for (int64_t c = 0; c < nc; ++c) {
      for (int j = 0; j < 16; ++j) {
        vr[c * 32 + j] = table[qr[c * 16 + j] & 15];
        vr[c * 32 + 16 + j] = table[qr[c * 16 + j] >> 4];
      }
    }
  }
}

struct Problem {
  const int8_t* a;     // [M, K] decoded activations
  const float* sa;     // [M, K/32] half scales
  const int8_t* w;     // [N, K] decoded weights (the decoded path; + 12 on the AVX-512 VNNI path)
  const uint8_t* wq;   // [N, K/2] packed weight codes (the packed path: few activation rows)
  const uint8_t* ws;   // [N, K/B] weight scale bytes (the packed path)
  const float* sw;     // [N, K/32] weight half scales per chunk (the decoded path)
  int64_t nb, cpb;     // blocks per row, chunks per block
  const float* bias;   // [N] or nullptr
  void* out;           // [M, N] of out_t
  at::ScalarType out_t;
  int64_t M, N, K;
};

inline void store(const Problem& p, int64_t m, int64_t n, float v) {
  if (p.bias) v += p.bias[n];
  tme_cpu::store_as(p.out, p.out_t, m * p.N + n, v);
}

// The weight's half scale for row n, chunk c: looked up from its byte on the packed path (a table
// written per call would cost as much as the few-row product itself), precomputed otherwise.
template <bool PACKED>
inline float weight_half_scale(const Problem& p, int64_t n, int64_t c) {
  if (PACKED) return kHalfScale.v[p.ws[n * p.nb + (p.cpb == 1 ? c : c / p.cpb)]];
  return p.sw[n * (p.K / 32) + c];
}

// Output tile rows m0..m0+MR-1, columns n0..n0+NR-1.
template <int MR, int NR, bool PACKED>
void tile_scalar(const Problem& p, int64_t m0, int64_t n0) {
  const int64_t nc = p.K / 32;
  float acc[MR][NR] = {};
  for (int64_t c = 0; c < nc; ++c) {
    for (int i = 0; i < MR; ++i) {
      const int8_t* a = p.a + (m0 + i) * p.K + c * 32;
      for (int j = 0; j < NR; ++j) {
        int8_t wbuf[32];
        const int8_t* w = p.w + (n0 + j) * p.K + c * 32;
        if (PACKED) {
          const uint8_t* q = p.wq + (n0 + j) * (p.K / 2) + c * 16;
          for (int k = 0; k < 16; ++k) {
            wbuf[k] = kE2M1x2[q[k] & 15];
            wbuf[16 + k] = kE2M1x2[q[k] >> 4];
          }
          w = wbuf;
        }
        int32_t dot = 0;
        for (int k = 0; k < 32; ++k) dot += static_cast<int32_t>(a[k]) * static_cast<int32_t>(w[k]);
        acc[i][j] += static_cast<float>(dot) * (p.sa[(m0 + i) * nc + c] * weight_half_scale<PACKED>(p, n0 + j, c));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) store(p, m0 + i, n0 + j, acc[i][j]);
}

#ifdef TME_X86_SIMD
// PACKED: decode the weight chunks in registers (a tile of few rows reads each weight chunk once);
// otherwise read the weight rows decoded beforehand (each is reused by every row tile).
template <int MR, int NR, bool PACKED>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t m0, int64_t n0) {
  const int64_t nc = p.K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2M1x2)));
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m256i w[NR];
    __m256 sw[NR];
    for (int j = 0; j < NR; ++j) {
      w[j] = PACKED ? decode_chunk_avx2(p.wq + (n0 + j) * (p.K / 2) + c * 16, lut, low4)
                    : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w + (n0 + j) * p.K + c * 32));
      sw[j] = _mm256_set1_ps(weight_half_scale<PACKED>(p, n0 + j, c));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a + (m0 + i) * p.K + c * 32));
      const __m256i a_abs = _mm256_sign_epi8(a, a);
      const __m256 sa = _mm256_set1_ps(p.sa[(m0 + i) * nc + c]);
      for (int j = 0; j < NR; ++j) {
        // |a| * (w * sign(a)) = a * w; pairs of products (|.| <= 288) fit int16, then int32 sums of 4.
        const __m256i prod16 = _mm256_maddubs_epi16(a_abs, _mm256_sign_epi8(w[j], a));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod16, ones));
        acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(dot, sw[j]), sa, acc[i][j]);  // both products exact
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) store(p, m0 + i, n0 + j, tme_cpu::hsum8(acc[i][j]));
  }
}

#define TME_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma"

// Packed codes of two chunks (32 bytes; 16 with the upper half zero-extended for a last, odd chunk)
// -> 64 int8 in chunk order: chunk c's low nibbles, its high ones, then chunk c + 1's.
__attribute__((target(TME_VNNI_TARGET))) inline __m512i decode_chunk_pair_vnni(__m512i packed, __m512i lut, __m512i low4) {
  const __m512i dup = _mm512_shuffle_i64x2(packed, packed, _MM_SHUFFLE(1, 1, 0, 0));  // 128-bit lanes q0 q0 q1 q1
  const __m512i nibbles = _mm512_mask_blend_epi64(0xCC, dup, _mm512_srli_epi16(dup, 4));  // lanes 1, 3: high nibbles
  return _mm512_shuffle_epi8(lut, _mm512_and_si512(nibbles, low4));
}

// Two per-chunk scales, one per 256-bit half (the lanes of chunk c, then of chunk c + 1).
__attribute__((target(TME_VNNI_TARGET))) inline __m512 scale_pair(float s0, float s1) {
  return _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
}

// Two chunks (64 bytes) of a decoded int8 row, or the last, odd one with zeros after it.
__attribute__((target(TME_VNNI_TARGET))) inline __m512i load_chunk_pair(const int8_t* v, bool pair) {
  return pair ? _mm512_loadu_si512(v) : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
}

template <int MR, int NR, bool PACKED>
__attribute__((target(TME_VNNI_TARGET))) void tile_vnni(const Problem& p, int64_t m0, int64_t n0) {
  const int64_t nc = p.K / 32;
  const __m512i zero = _mm512_setzero_si512();
  const __m512i offset = _mm512_set1_epi8(kE2M1x2Bias);
  const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2M1x2Biased)));
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; c += 2) {
    const bool pair = c + 1 < nc;  // a last, odd chunk: the upper half has zero activations, scale 0
    __m512i w[NR];  // w + 12
    __m512 sw[NR];
    for (int j = 0; j < NR; ++j) {
      if (PACKED) {
        const uint8_t* q = p.wq + (n0 + j) * (p.K / 2) + c * 16;
        const __m512i packed = pair ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)))
                                    : _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        w[j] = decode_chunk_pair_vnni(packed, lut, low4);
      } else {
        w[j] = load_chunk_pair(p.w + (n0 + j) * p.K + c * 32, pair);
      }
      sw[j] = scale_pair(weight_half_scale<PACKED>(p, n0 + j, c), pair ? weight_half_scale<PACKED>(p, n0 + j, c + 1) : 0.0f);
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const __m512i a = load_chunk_pair(p.a + m * p.K + c * 32, pair);
      const __m512i a_offset = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, a));  // -12 * each lane's sum of 4 a
      const __m512 sa = scale_pair(p.sa[m * nc + c], pair ? p.sa[m * nc + c + 1] : 0.0f);
      for (int j = 0; j < NR; ++j) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(a_offset, w[j], a));  // sum a w per 4, exact
        acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(dot, sw[j]), sa, acc[i][j]);  // both products exact
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) store(p, m0 + i, n0 + j, _mm512_reduce_add_ps(acc[i][j]));
}


// -12 * the sum of each 32-element chunk of the decoded activation rows [r0, r1) (see tile_panels).
__attribute__((target("avx2"))) void chunk_corrections(const int8_t* a, int64_t r0, int64_t r1, int64_t K, int32_t* corr) {
  const int64_t nc = K / 32;
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * K + c * 32));
      const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16);  // 8 sums of 4, exact
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
      corr[r * nc + c] = -kE2M1x2Bias * _mm_cvtsi128_si32(t);
    }
  }
}
#endif  // TME_X86_SIMD

constexpr int kMR = 4, kNR = 2;

template <int MR, int NR, bool PACKED>
void tile(int isa, const Problem& p, int64_t m0, int64_t n0) {
#ifdef TME_X86_SIMD
  if (isa == kIsaAvx512) return tile_vnni<MR, NR, PACKED>(p, m0, n0);
  if (isa == kIsaAvx2) return tile_avx2<MR, NR, PACKED>(p, m0, n0);
#endif
  tile_scalar<MR, NR, PACKED>(p, m0, n0);
}

template <int NR, bool PACKED>
void tile_rows(int isa, const Problem& p, int64_t m0, int64_t n0) {
  switch (std::min<int64_t>(kMR, p.M - m0)) {
    case 1: return tile<1, NR, PACKED>(isa, p, m0, n0);
    case 2: return tile<2, NR, PACKED>(isa, p, m0, n0);
    case 3: return tile<3, NR, PACKED>(isa, p, m0, n0);
    default: return tile<kMR, NR, PACKED>(isa, p, m0, n0);
  }
}

// Columns [n0, n1) for every row tile.
template <bool PACKED>
void columns(int isa, const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < p.M; m0 += kMR) {
    int64_t n = n0;
    for (; n + kNR <= n1; n += kNR) tile_rows<kNR, PACKED>(isa, p, m0, n);
    for (; n < n1; ++n) tile_rows<1, PACKED>(isa, p, m0, n);
  }
}

// Weight rows a parallel task owns: decoded once into a buffer that stays in L1/L2 while every row
// tile of the activation passes over it.
constexpr int64_t kColBlock = 16;
// Multiply-adds per parallel task, so that tiny products stay on one thread.
constexpr int64_t kGrainMacs = int64_t(1) << 16;

at::Tensor mxfp4_mm(const at::Tensor& a_qdata, const at::Tensor& a_scale, const at::Tensor& w_qdata,
                    const at::Tensor& w_scale, int64_t block_size, const c10::optional<at::Tensor>& bias,
                    c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(a_qdata.device().is_cpu() && a_scale.device().is_cpu() && w_qdata.device().is_cpu() &&
                  w_scale.device().is_cpu(),
              "mxfp4_mm: CPU tensors expected");
  TORCH_CHECK(a_qdata.scalar_type() == at::kByte && a_scale.scalar_type() == at::kByte &&
                  w_qdata.scalar_type() == at::kByte && w_scale.scalar_type() == at::kByte,
              "mxfp4_mm: codes and scales must be uint8");
  TORCH_CHECK(w_qdata.dim() == 2 && w_scale.dim() == 2, "mxfp4_mm: the weight's codes and scales must be 2-D");
  TORCH_CHECK(a_qdata.dim() >= 1 && a_scale.dim() == a_qdata.dim(), "mxfp4_mm: the activation's codes and scales differ in rank");
  TORCH_CHECK(block_size > 0 && block_size % 32 == 0, "mxfp4_mm: block_size must be a multiple of 32, got ", block_size);
  const int64_t N = w_qdata.size(0), K = w_qdata.size(1) * 2;
  TORCH_CHECK(K > 0 && K % block_size == 0, "mxfp4_mm: the weight's width ", K, " is no positive multiple of ", block_size);
  TORCH_CHECK(a_qdata.size(-1) * 2 == K, "mxfp4_mm: the activation has ", a_qdata.size(-1) * 2, " features, the weight ", K);
  TORCH_CHECK(w_scale.size(0) == N && w_scale.size(1) == K / block_size, "mxfp4_mm: weight scale shape ",
              w_scale.sizes(), " does not match codes ", w_qdata.sizes(), " in blocks of ", block_size);
  for (int64_t d = 0; d + 1 < a_qdata.dim(); ++d) {
    TORCH_CHECK(a_scale.size(d) == a_qdata.size(d), "mxfp4_mm: activation scale shape ", a_scale.sizes(),
                " does not match codes ", a_qdata.sizes());
  }
  TORCH_CHECK(a_scale.size(-1) == K / block_size, "mxfp4_mm: activation scale shape ", a_scale.sizes(),
              " does not match codes ", a_qdata.sizes(), " in blocks of ", block_size);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu(), "mxfp4_mm: bias must be a CPU [N] tensor");
  }
  const at::ScalarType out_t = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(out_t == at::kFloat || out_t == at::kBFloat16 || out_t == at::kHalf,
              "mxfp4_mm: out_dtype must be float32, bfloat16 or float16");

  std::vector<int64_t> out_shape(a_qdata.sizes().begin(), a_qdata.sizes().end());
  out_shape.back() = N;
  auto out = at::empty(out_shape, a_qdata.options().dtype(out_t));
  const int64_t M = a_qdata.numel() / (K / 2);
  if (M == 0 || N == 0) return out;

  const int isa = current_isa();
  const int64_t nc = K / 32;
  const auto aq = a_qdata.contiguous(), as = a_scale.contiguous(), wq = w_qdata.contiguous(), ws = w_scale.contiguous();
  auto a_vals = at::empty({M, K}, a_qdata.options().dtype(at::kChar));
  auto a_sc = at::empty({M, nc}, a_qdata.options().dtype(at::kFloat));
  // One row tile: each weight chunk is read once, so it is decoded in registers (no buffer).
  const bool packed = M <= kMR;
  // Many rows on AVX-512 VNNI: the panel GEMM (each task packs its columns once for all row tiles).
  const bool panels = !packed && isa == kIsaAvx512;
  auto w_vals = at::empty({packed || panels ? 0 : N, K}, a_qdata.options().dtype(at::kChar));
  auto w_sc = at::empty({packed || panels ? 0 : N, nc}, a_qdata.options().dtype(at::kFloat));

  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  Problem p{a_vals.data_ptr<int8_t>(), a_sc.data_ptr<float>(), w_vals.data_ptr<int8_t>(), wq.data_ptr<uint8_t>(),
            ws.data_ptr<uint8_t>(), w_sc.data_ptr<float>(), K / block_size, block_size / 32,
            bias.has_value() ? bias_f.data_ptr<float>() : nullptr, out.data_ptr(), out_t, M, N, K};

  auto a_corr = at::empty({panels ? M : 0, nc}, a_qdata.options().dtype(at::kInt));
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t r0, int64_t r1) {
    decode_rows(isa, aq.data_ptr<uint8_t>(), as.data_ptr<uint8_t>(), r0, r1, K, block_size, a_vals.data_ptr<int8_t>(),
                a_sc.data_ptr<float>());
#ifdef TME_X86_SIMD
    if (panels) chunk_corrections(a_vals.data_ptr<int8_t>(), r0, r1, K, a_corr.data_ptr<int32_t>());
#endif
  });
#ifdef TME_X86_SIMD
  if (panels) {
    tme_cpu::panel_gemm({wq.data_ptr<uint8_t>(), ws.data_ptr<uint8_t>(), kHalfScale.v, a_vals.data_ptr<int8_t>(), a_corr.data_ptr<int32_t>(),
                         a_sc.data_ptr<float>(), p.bias, out.data_ptr(), out_t, M, N, K, block_size});
    return out;
  }
#endif
  const int64_t n_blocks = (N + kColBlock - 1) / kColBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, M * K * kColBlock));
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kColBlock, n1 = std::min(N, n0 + kColBlock);
      if (packed) {
        columns<true>(isa, p, n0, n1);
      } else {
        decode_rows(isa, wq.data_ptr<uint8_t>(), ws.data_ptr<uint8_t>(), n0, n1, K, block_size, w_vals.data_ptr<int8_t>(),
                    w_sc.data_ptr<float>(), isa == kIsaAvx512 ? kE2M1x2Biased : kE2M1x2);
        columns<false>(isa, p, n0, n1);
      }
    }
  });
  return out;
}

// Test hook: cap the code path (0 scalar, 1 AVX2, 2 AVX-512 VNNI; -1 = best available). Returns the path now in use.
int64_t mxfp4_mm_set_isa(int64_t isa) {
  g_isa_override.store(static_cast<int>(isa));
  return current_isa();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) { m.def("_mxfp4_mm_set_isa(int isa) -> int", &mxfp4_mm_set_isa); }

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) { m.impl("mxfp4_mm", &mxfp4_mm); }
