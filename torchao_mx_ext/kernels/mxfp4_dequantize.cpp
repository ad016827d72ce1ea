// MXFP4 codes + E8M0 scales -> a dense bfloat16 or float32 tensor, exactly, for CPUs:
//   out[r, k] = E2M1(q[r, k]) * 2^(s[r, k / B] - 127)        (NaN for scale byte 255)
// The CPU kernel of torchao_mx_ext::mxfp4_dequantize; the operator (schema, fake kernel, pure-torch
// fallback) is defined in Python: torchao_mx_ext/kernels/cpu_mxfp4_dequantize.py.
//
// Why a kernel: on CPUs with fast bf16 or float32 GEMMs (AMX, AVX-512; AVX2 at prompt sizes), decoding
// a weight once per call and handing it to oneDNN/MKL is faster for many rows than any integer or
// fused path, and the pure-torch decode (unpack, table, multiply, cast: several passes over the
// tensor) costs more than the GEMM itself.
//
// The arithmetic: every E2M1 value is +-{0, .5, 1, 1.5, 2, 3, 4, 6}, one mantissa bit, so times a power
// of two it is exact in bfloat16 and float32 unless it leaves their normal range. The AVX-512 path
// therefore looks the code's bfloat16 bit pattern up (vpermw, 32 at a time) and adds the scale's
// exponent to the exponent field of the non-zero ones (a masked 16-bit add); float32 is that pattern
// shifted left by 16. The AVX2 path does the same 16 at a time: vpshufb looks up the pattern's low
// and high bytes from two 16-entry tables, and a compare-and-mask replaces the masked add. Blocks
// whose scale could leave the normal range (byte < 2 or > 252) or is NaN take the scalar path:
// float32 multiply, then one round-to-nearest-even to bfloat16, the same operations as the pure-torch
// dequantize. All paths give the pure-torch result bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace {

constexpr float kE2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
// bfloat16 bit patterns of the E2M1 values (scale 1).
constexpr uint16_t kE2M1Bf16[16] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
constexpr int kFastScaleMin = 2, kFastScaleMax = 252;  // 0.5 * 2^(b-127) and 6 * 2^(b-127) stay normal

using tme_cpu::kIsaAvx2;
using tme_cpu::kIsaAvx512;
using tme_cpu::kIsaScalar;
std::atomic<int> g_isa_override{-1};

int current_isa() { return tme_cpu::current_isa(g_isa_override, tme_cpu::has_avx512_bw() ? kIsaAvx512 : kIsaAvx2); }

template <typename out_t>
inline void store_value(out_t* out, float v);
template <>
inline void store_value<float>(float* out, float v) { *out = v; }
template <>
inline void store_value<c10::BFloat16>(c10::BFloat16* out, float v) { *out = c10::BFloat16(v); }  // round to nearest even

// One block of B elements (B / 2 bytes), as the pure-torch dequantize computes it.
template <typename out_t>
void block_scalar(const uint8_t* q, uint8_t scale, int64_t B, out_t* out) {
  const float s = scale == 255 ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(1.0f, int(scale) - 127);
  for (int64_t i = 0; i < B / 2; ++i) {
    store_value(out + 2 * i, kE2M1[q[i] & 15] * s);
    store_value(out + 2 * i + 1, kE2M1[q[i] >> 4] * s);
  }
}

#ifdef TME_X86_SIMD
#define TME_DEQUANT_TARGET "avx512f,avx512bw,avx512vl,avx512dq"

// 32 elements (16 bytes of codes) -> 32 bfloat16 bit patterns, element order, scaled by 2^(b - 127).
__attribute__((target(TME_DEQUANT_TARGET))) inline __m512i chunk_bf16(const uint8_t* q, __m512i lut, __m512i exponent) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  // int32 lane i = (high nibble << 16) | low nibble: 16-bit lanes 2i, 2i + 1 = elements 2i, 2i + 1.
  const __m512i codes = _mm512_or_si512(_mm512_and_si512(bytes, _mm512_set1_epi32(15)),
                                        _mm512_slli_epi32(_mm512_srli_epi32(bytes, 4), 16));
  const __m512i v = _mm512_permutexvar_epi16(codes, lut);
  const __mmask32 nonzero = _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x7FFF));
  return _mm512_mask_add_epi16(v, nonzero, v, exponent);
}

template <typename out_t>
__attribute__((target(TME_DEQUANT_TARGET))) void row_avx512(const uint8_t* q, const uint8_t* sc, int64_t K, int64_t B, out_t* out) {
  const __m512i lut = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kE2M1Bf16)));
  for (int64_t b = 0; b < K / B; ++b) {
    const uint8_t s = sc[b];
    if (s < kFastScaleMin || s > kFastScaleMax) {
      block_scalar(q + b * B / 2, s, B, out + b * B);
      continue;
    }
    const __m512i exponent = _mm512_set1_epi16(static_cast<int16_t>((int(s) - 127) * 128));  // bf16 exponent field
    for (int64_t c = 0; c < B / 32; ++c) {
      const __m512i v = chunk_bf16(q + b * B / 2 + c * 16, lut, exponent);
      out_t* o = out + b * B + c * 32;
      if constexpr (std::is_same_v<out_t, float>) {  // bfloat16 -> float32: the same bits, shifted up
        _mm512_storeu_si512(o, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
        _mm512_storeu_si512(o + 16, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
      } else {
        _mm512_storeu_si512(o, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: the same bit patterns and exponent add, 16 lanes of 16 bits at a time.

// The low and the high bytes of kE2M1Bf16, as vpshufb tables (entry 0 is zero in both, which the
// lookup of a 16-bit lane's zero high byte relies on).
struct Bf16ByteTables {
  alignas(16) uint8_t lo[16];
  alignas(16) uint8_t hi[16];
  Bf16ByteTables() {
    for (int i = 0; i < 16; ++i) {
      lo[i] = static_cast<uint8_t>(kE2M1Bf16[i] & 0xFF);
      hi[i] = static_cast<uint8_t>(kE2M1Bf16[i] >> 8);
    }
  }
};
const Bf16ByteTables kBf16Bytes;

// 16 codes in 16-bit lanes -> their bfloat16 patterns scaled by the exponent-field increment `exponent`.
__attribute__((target("avx2"))) inline __m256i codes_bf16_avx2(__m256i codes, __m256i lut_lo, __m256i lut_hi, __m256i exponent) {
  // A lane holds (code, 0): its low byte looks up the code, its high byte entry 0 (zero).
  const __m256i v = _mm256_or_si256(_mm256_shuffle_epi8(lut_lo, codes), _mm256_slli_epi16(_mm256_shuffle_epi8(lut_hi, codes), 8));
  const __m256i zero = _mm256_cmpeq_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7FFF)), _mm256_setzero_si256());
  return _mm256_add_epi16(v, _mm256_andnot_si256(zero, exponent));  // +-0 keep their pattern
}

template <typename out_t>
__attribute__((target("avx2"))) inline void store16_avx2(out_t* o, __m256i v) {
  if constexpr (std::is_same_v<out_t, float>) {  // bfloat16 -> float32: the same bits, shifted up
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), v);
  }
}

template <typename out_t>
__attribute__((target("avx2"))) void row_avx2(const uint8_t* q, const uint8_t* sc, int64_t K, int64_t B, out_t* out) {
  const __m256i lut_lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kBf16Bytes.lo)));
  const __m256i lut_hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kBf16Bytes.hi)));
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t b = 0; b < K / B; ++b) {
    const uint8_t s = sc[b];
    if (s < kFastScaleMin || s > kFastScaleMax) {
      block_scalar(q + b * B / 2, s, B, out + b * B);
      continue;
    }
    const __m256i exponent = _mm256_set1_epi16(static_cast<int16_t>((int(s) - 127) * 128));  // bf16 exponent field
    for (int64_t c = 0; c < B / 32; ++c) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * B / 2 + c * 16));
      const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
      // Element order: element 2i is byte i's low nibble, 2i + 1 its high one.
      out_t* o = out + b * B + c * 32;
      store16_avx2(o, codes_bf16_avx2(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi)), lut_lo, lut_hi, exponent));
      store16_avx2(o + 16, codes_bf16_avx2(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi)), lut_lo, lut_hi, exponent));
    }
  }
}
#endif  // TME_X86_SIMD

template <typename out_t>
void dequantize_rows(int isa, const uint8_t* q, const uint8_t* sc, int64_t r0, int64_t r1, int64_t K, int64_t B, out_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* qr = q + r * (K / 2);
    const uint8_t* sr = sc + r * (K / B);
    out_t* o = out + r * K;
#ifdef TME_X86_SIMD
    if (isa == kIsaAvx512) {
      row_avx512(qr, sr, K, B, o);
      continue;
    }
    if (isa == kIsaAvx2) {
      row_avx2(qr, sr, K, B, o);
      continue;
    }
#endif
    for (int64_t b = 0; b < K / B; ++b) block_scalar(qr + b * B / 2, sr[b], B, o + b * B);
  }
}

at::Tensor mxfp4_dequantize(const at::Tensor& qdata, const at::Tensor& scale, int64_t block_size, at::ScalarType dtype) {
  TORCH_CHECK(qdata.device().is_cpu() && scale.device().is_cpu(), "mxfp4_dequantize: CPU tensors expected");
  TORCH_CHECK(qdata.scalar_type() == at::kByte && scale.scalar_type() == at::kByte, "mxfp4_dequantize: codes and scales must be uint8");
  TORCH_CHECK(qdata.dim() >= 1 && scale.dim() == qdata.dim(), "mxfp4_dequantize: codes and scales differ in rank");
  TORCH_CHECK(block_size > 0 && block_size % 32 == 0, "mxfp4_dequantize: block_size must be a multiple of 32, got ", block_size);
  const int64_t K = qdata.size(-1) * 2;
  TORCH_CHECK(K % block_size == 0 && scale.size(-1) == K / block_size, "mxfp4_dequantize: scale shape ", scale.sizes(),
              " does not match codes ", qdata.sizes(), " in blocks of ", block_size);
  for (int64_t d = 0; d + 1 < qdata.dim(); ++d) {
    TORCH_CHECK(scale.size(d) == qdata.size(d), "mxfp4_dequantize: scale shape ", scale.sizes(), " does not match codes ", qdata.sizes());
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "mxfp4_dequantize: dtype must be float32 or bfloat16");
  std::vector<int64_t> shape(qdata.sizes().begin(), qdata.sizes().end());
  shape.back() = K;
  auto out = at::empty(shape, qdata.options().dtype(dtype));
  const int64_t R = K == 0 ? 0 : qdata.numel() / (K / 2);
  if (R == 0 || K == 0) return out;
  const auto q = qdata.contiguous(), s = scale.contiguous();
  const int isa = current_isa();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    if (dtype == at::kFloat) {
      dequantize_rows(isa, q.data_ptr<uint8_t>(), s.data_ptr<uint8_t>(), r0, r1, K, block_size, out.data_ptr<float>());
    } else {
      dequantize_rows(isa, q.data_ptr<uint8_t>(), s.data_ptr<uint8_t>(), r0, r1, K, block_size, out.data_ptr<c10::BFloat16>());
    }
  });
  return out;
}

// Test hook: cap the code path (0 scalar, 1 AVX2, 2 AVX-512; -1 = best available). Returns the path now in use.
int64_t mxfp4_dequantize_set_isa(int64_t isa) {
  g_isa_override.store(static_cast<int>(isa));
  return current_isa();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) { m.def("_mxfp4_dequantize_set_isa(int isa) -> int", &mxfp4_dequantize_set_isa); }

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) { m.impl("mxfp4_dequantize", &mxfp4_dequantize); }
