// The panel GEMM of the integer W4A4 kernels (AVX-512 VNNI): many activation rows against an MXFP4
// weight, used by mxfp4_mm.cpp (codes x codes) and by the integer path of mxfp4_gemv.cpp (MX-form
// float inputs, prompts).
//
// The weight is repacked, a few panels at a time, so that one vpdpbusd multiplies four elements of one
// activation row (a broadcast dword) by the same four elements of 16 weight rows (output columns): the
// int32 lanes are outputs, no horizontal sums are needed, and 8 instructions make a 32-element chunk's
// dot products for 16 outputs. The weight enters as 2q + 12 in [0, 24] (vpdpbusd's unsigned operand);
// the accumulators start at -12 * (sum of the chunk's activations), so the offset cancels exactly in
// int32. Per chunk and output the float epilogue is y += (dot * s_w) * s_a, both products exact powers
// of two times an integer below 2^24 (as in the kernels' other integer paths); chunks are summed in
// order, so results equal the float emulation's up to float32 summation order. Outputs are rounded to
// bf16 / fp16 in registers (nearest even, as c10's conversions).
//
// Panel layout (per panel of 16 columns; columns past N are zero weights with scale 0):
//   codes [chunk c][quad q][column l][4] = 2w + 12 of chunk elements 4q..4q+3 (chunk order: the 16
//   low nibbles, then the 16 high ones -- the activation rows use the same order);
//   scales [chunk c][column l] = the weight's scale for that chunk (from the caller's byte table).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "mxfp4_codes.h"

#ifdef TME_X86_SIMD
namespace tme_cpu {

#define TME_PANEL_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma"

// One chunk of packed codes (16 bytes) -> 32 int8 in chunk order (the low nibbles, then the high
// ones), through a 16-entry vpshufb table.
__attribute__((target("avx2"))) inline __m256i decode_chunk_avx2(const uint8_t* q, __m256i lut, __m256i low4) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), low4));
}

struct PanelGemm {
  const uint8_t* wq;      // [N, K/2] weight codes
  const uint8_t* ws;      // [N, K/B] E8M0 bytes
  const float* w_scale;   // [256]: byte -> the weight's factor in the epilogue
  const int8_t* a;        // [M, K] activation integers, chunk order
  const int32_t* a_corr;  // [M, K/32] -12 * each chunk's sum of a
  const float* a_scale;   // [M, K/32] each chunk's factor in the epilogue
  const float* bias;      // [N] or nullptr
  void* out;              // [M, N] of out_t
  at::ScalarType out_t;
  int64_t M, N, K, B;
};

constexpr int kPanelCols = 16;
constexpr int kPanelMR = 4, kPanelNR = 3;  // a tile: 4 activation rows x 3 panels (48 columns)

// The panels of weight rows (= output columns) [n0, n0 + 16 * panels) into codes / scales.
__attribute__((target(TME_PANEL_TARGET))) inline void pack_panels(const PanelGemm& p, int64_t n0, int64_t panels, uint8_t* codes,
                                                                   float* scales) {
  const int64_t nc = p.K / 32, nb = p.K / p.B, cpb = p.B / 32;
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2M1x2Biased)));
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i dword_stride = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);  // quad q of column l: dword 16 q + l
  for (int64_t j = 0; j < panels; ++j) {
    uint8_t* pc = codes + j * nc * 512;
    float* ps = scales + j * nc * kPanelCols;
    for (int l = 0; l < kPanelCols; ++l) {
      const int64_t n = n0 + j * kPanelCols + l;
      if (n >= p.N) {
        for (int64_t c = 0; c < nc; ++c) {
          for (int q = 0; q < 8; ++q) std::memset(pc + c * 512 + q * 64 + l * 4, kE2M1x2Bias, 4);
          ps[c * kPanelCols + l] = 0.0f;
        }
        continue;
      }
      for (int64_t c = 0; c < nc; ++c) {
        _mm256_i32scatter_epi32(pc + c * 512 + l * 4, dword_stride, decode_chunk_avx2(p.wq + n * (p.K / 2) + c * 16, lut, low4), 4);
        ps[c * kPanelCols + l] = p.w_scale[p.ws[n * nb + (cpb == 1 ? c : c / cpb)]];
      }
    }
  }
}

// out[m, n .. n + count) = v (+ bias), count <= 16, rounded to out_t (nearest even, as store_as).
__attribute__((target(TME_PANEL_TARGET))) inline void store16(const PanelGemm& p, int64_t m, int64_t n, int64_t count, __m512 v) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias + n));
  const int64_t i = m * p.N + n;
  if (p.out_t == at::kFloat) {
    _mm512_mask_storeu_ps(static_cast<float*>(p.out) + i, mask, v);
    return;
  }
  __m256i h;
  if (p.out_t == at::kBFloat16) {  // c10::BFloat16's rounding: (bits + 0x7FFF + lsb) >> 16, NaN -> 0x7FC0
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    h = _mm512_cvtepi32_epi16(r);
  } else {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out) + i, mask, h);
}

// Rows m0..m0+MR-1 against the NR packed panels (their first column n0).
template <int MR, int NR>
__attribute__((target(TME_PANEL_TARGET))) inline void tile_panels(const PanelGemm& p, const uint8_t* codes, const float* scales, int64_t m0,
                                                                   int64_t n0) {
  const int64_t nc = p.K / 32;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; ++c) {
    __m512i dot[MR][NR];
    for (int i = 0; i < MR; ++i) {
      const __m512i start = _mm512_set1_epi32(p.a_corr[(m0 + i) * nc + c]);
      for (int j = 0; j < NR; ++j) dot[i][j] = start;
    }
    const uint8_t* wc = codes + c * 512;
    const int8_t* ac = p.a + m0 * p.K + c * 32;
    for (int q = 0; q < 8; ++q) {
      __m512i w[NR];
      for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_si512(wc + j * nc * 512 + q * 64);
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, ac + i * p.K + 4 * q, 4);
        const __m512i x = _mm512_set1_epi32(four);
        for (int j = 0; j < NR; ++j) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], w[j], x);
      }
    }
    __m512 sw[NR];
    for (int j = 0; j < NR; ++j) sw[j] = _mm512_loadu_ps(scales + (j * nc + c) * kPanelCols);
    for (int i = 0; i < MR; ++i) {
      const __m512 sa = _mm512_set1_ps(p.a_scale[(m0 + i) * nc + c]);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][j]), sw[j]), sa, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const int64_t n = n0 + j * kPanelCols;
      if (n < p.N) store16(p, m0 + i, n, std::min<int64_t>(kPanelCols, p.N - n), acc[i][j]);
    }
  }
}

// Every activation row against the NR packed panels.
template <int NR>
inline void panel_rows(const PanelGemm& p, const uint8_t* codes, const float* scales, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + kPanelMR <= p.M; m0 += kPanelMR) tile_panels<kPanelMR, NR>(p, codes, scales, m0, n0);
  switch (p.M - m0) {
    case 1: tile_panels<1, NR>(p, codes, scales, m0, n0); break;
    case 2: tile_panels<2, NR>(p, codes, scales, m0, n0); break;
    case 3: tile_panels<3, NR>(p, codes, scales, m0, n0); break;
    default: break;
  }
}

// out = a w^T (+ bias): groups of 48 output columns split across ATen's threads, each packed once.
inline void panel_gemm(const PanelGemm& p) {
  constexpr int64_t kGroupCols = kPanelNR * kPanelCols;
  const int64_t nc = p.K / 32, groups = (p.N + kGroupCols - 1) / kGroupCols;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> codes(kPanelNR * nc * 512);
    std::vector<float> scales(kPanelNR * nc * kPanelCols);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kGroupCols, panels = std::min<int64_t>(kPanelNR, (p.N - n0 + kPanelCols - 1) / kPanelCols);
      pack_panels(p, n0, panels, codes.data(), scales.data());
      if (panels == 3) panel_rows<3>(p, codes.data(), scales.data(), n0);
      else if (panels == 2) panel_rows<2>(p, codes.data(), scales.data(), n0);
      else panel_rows<1>(p, codes.data(), scales.data(), n0);
    }
  });
}

}  // namespace tme_cpu
#endif  // TME_X86_SIMD
