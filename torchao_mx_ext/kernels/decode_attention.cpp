// Scaled dot-product attention for a few query rows (a decode step) on CPUs:
//   out[b, h, i] = sum_l p[i, l] v[b, h, l] / sum_l p[i, l],   p[i, l] = exp(s[i, l] - max_l s[i, l]),
//   s[i, l] = scale * q[b, h, i] . k[b, h, l] + mask[i, l]
// with a boolean mask (false: the key is left out) or an additive floating one; a row whose keys are
// all left out gives zeros (as ATen's CPU flash attention does). F.scaled_dot_product_attention's
// math for q [B, H, Lq, D], k [B, H, L, D], v [B, H, L, Dv] (no dropout, no GQA broadcast: the caller
// packs grouped query heads into Lq), mask broadcastable to [B, H, Lq, L].
//
// The CPU kernel of torchao_mx_ext::decode_attention; the operator (schema, fake kernel, pure-torch
// fallback) is defined in Python: torchao_mx_ext/kernels/cpu_decode_attention.py. Numbers: q, k, v are
// widened to float32; scores, the softmax and the weighted sum of values are float32 (the weights are
// not rounded to the input dtype, which ATen's bf16 flash attention does), the output is rounded once
// to q's dtype. exp is std::exp on the scalar path and a polynomial on the AVX2 one (about 2 ulps;
// weights below e^-87 of the row's largest are 0).
//
// Why: ATen's CPU flash attention tiles for long queries; for one to a few query rows on CPUs without
// native bf16 GEMMs (AVX2) it spends most of its time in emulated bf16 GEMMs: ~120-190 us for
// SmolLM2-135M's decode step (3 heads x 3 packed rows, 578 cached keys, one thread), where the
// arithmetic is ~0.7 M multiply-adds. Here (AVX2, bf16 / float32, D and Dv multiples of 8) each key
// and value chunk is widened once for a group of up to three query rows: ~50 us there. On AVX-512 BF16
// CPUs bf16 scores are vdpbf16ps dot products (D a multiple of 32; ATen's kernel took ~100 us on a
// Zen 4 core). Other cases (float16, odd widths, CPUs without AVX2) take plain loops.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_ops.h"

namespace {

using tme_cpu::kIsaAvx2;
using tme_cpu::kIsaAvx512Bf16;
using tme_cpu::kIsaScalar;
std::atomic<int> g_isa_override{-1};

int current_isa() { return tme_cpu::current_isa(g_isa_override, kIsaAvx512Bf16); }

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A query row's mask m (nullptr: none) leaves key l out: false in a boolean mask, -inf in an additive one.
template <typename mask_t>
inline bool left_out(const mask_t* m, int64_t l) {
  if constexpr (std::is_same_v<mask_t, bool>) {
    return m != nullptr && !m[l];
  } else {
    return m != nullptr && m[l] == kNegInf;
  }
}

// Score x of key l under the mask m.
template <typename mask_t>
inline float masked(const mask_t* m, int64_t l, float x) {
  if constexpr (std::is_same_v<mask_t, bool>) {
    return m != nullptr && !m[l] ? kNegInf : x;
  } else {
    return m == nullptr ? x : x + m[l];
  }
}

template <typename scalar_t>
inline void widen(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_scalar(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

float softmax_numerators_scalar(float* s, int64_t L, float mx) {
  float sum = 0.0f;
  for (int64_t l = 0; l < L; ++l) {
    s[l] = std::exp(s[l] - mx);  // exp(-inf) = 0: masked-out keys
    sum += s[l];
  }
  return sum;
}

#ifdef TME_X86_SIMD
// s[l] <- exp(s[l] - mx) for a row; returns their sum.
__attribute__((target("avx2,fma"))) float softmax_numerators_avx2(float* s, int64_t L, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    const __m256 p = tme_cpu::exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + l), m));
    _mm256_storeu_ps(s + l, p);
    acc = _mm256_add_ps(acc, p);
  }
  if (l < L) {  // the tail through a padded buffer (-inf lanes give 0)
    alignas(32) float t[8];
    for (int j = 0; j < 8; ++j) t[j] = l + j < L ? s[l + j] : -std::numeric_limits<float>::infinity();
    const __m256 p = tme_cpu::exp_nonpositive_avx2(_mm256_sub_ps(_mm256_load_ps(t), m));
    _mm256_store_ps(t, p);
    for (int64_t j = 0; l + j < L; ++j) s[l + j] = t[j];
    acc = _mm256_add_ps(acc, p);
  }
  return tme_cpu::hsum8(acc);
}

#endif

// 8 values from bf16 or float32 as float32 lanes.
// Key / value rows asked for ahead of use: the cache of a layer (~0.4 MB for SmolLM2 at 550 keys) is
// read once per step, from beyond the caches, and each row's first load otherwise waits for memory.
constexpr int64_t kAheadKeys = 8;

template <typename scalar_t>
__attribute__((target("avx2,fma"))) inline __m256 load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else {
    return tme_cpu::bf16x8_to_f32(reinterpret_cast<const uint16_t*>(p));
  }
}

// Scores of query rows i0..i0+RT-1 (widened, qf) against four key rows kl[0..4): each key chunk is
// widened once for all RT rows; four dot products reduce to one register with three vhaddps.
template <int RT, typename scalar_t>
__attribute__((target("avx2,fma"))) inline void scores_4keys(const float* qf, int64_t D, const scalar_t* const* kl, float dots[][4]) {
  __m256 a[RT][4];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_ps();
  // Registers: RT x 4 accumulators, RT query chunks and one key chunk (16 at RT = 3: no spills).
  for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(kl[j] + kAheadKeys * D), _MM_HINT_T0);
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[RT];
    for (int r = 0; r < RT; ++r) qv[r] = _mm256_loadu_ps(qf + r * D + d);
    for (int j = 0; j < 4; ++j) {
      const __m256 kv = load8(kl[j] + d);
      for (int r = 0; r < RT; ++r) a[r][j] = _mm256_fmadd_ps(qv[r], kv, a[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[r][0], a[r][1]), _mm256_hadd_ps(a[r][2], a[r][3]));
    _mm_storeu_ps(dots[r], _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
}

#ifdef TME_AVX512_BF16
// scores_4keys for bf16 q and k with AVX-512 BF16 (D a multiple of 32): vdpbf16ps multiplies 32 bf16
// pairs into float32 sums in one instruction, with no widening of q or k (products of bf16 values are
// exact in float32; the instruction treats subnormal inputs and results as zero).
template <int RT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void scores_4keys_bf16(const c10::BFloat16* q, int64_t D,
                                                                                     const c10::BFloat16* const* kl, float dots[][4]) {
  __m512 a[RT][4];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(kl[j] + kAheadKeys * D), _MM_HINT_T0);
  for (int64_t d = 0; d < D; d += 32) {
    __m512bh qv[RT];
    for (int r = 0; r < RT; ++r) qv[r] = (__m512bh)_mm512_loadu_si512(q + r * D + d);
    for (int j = 0; j < 4; ++j) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kl[j] + d);
      for (int r = 0; r < RT; ++r) a[r][j] = _mm512_dpbf16_ps(a[r][j], qv[r], kv);
    }
  }
  for (int r = 0; r < RT; ++r) _mm_storeu_ps(dots[r], tme_cpu::hsum16x4(a[r][0], a[r][1], a[r][2], a[r][3]));
}
#endif

// out rows i0..i0+RT-1, dimensions d0..d0+8*NV-1: sum_l p[r][l] v[l] * inv[r]; each value chunk is
// widened once for all RT rows, the accumulators stay in registers.
template <int RT, int NV, typename scalar_t>
__attribute__((target("avx2,fma"))) inline void weighted_values(const float* const* p, const float* inv, const scalar_t* v, int64_t L,
                                                              int64_t Dv, int64_t d0, scalar_t* const* out) {
  __m256 acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    // Left out by every row (weights are >= 0, so zero bits): integer tests keep a register free.
    uint32_t bits = 0;
    for (int r = 0; r < RT; ++r) {
      uint32_t b;
      std::memcpy(&b, p[r] + l, sizeof(b));
      bits |= b;
    }
    if (bits == 0) continue;
    _mm_prefetch(reinterpret_cast<const char*>(v + (l + kAheadKeys) * Dv + d0), _MM_HINT_T0);
    // Registers: RT x NV accumulators, RT weights and one value chunk (16 at RT = 3, NV = 4).
    __m256 pr[RT];
    for (int r = 0; r < RT; ++r) pr[r] = _mm256_set1_ps(p[r][l]);
    for (int j = 0; j < NV; ++j) {
      const __m256 vv = load8(v + l * Dv + d0 + 8 * j);
      for (int r = 0; r < RT; ++r) acc[r][j] = _mm256_fmadd_ps(pr[r], vv, acc[r][j]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    const __m256 ir = _mm256_set1_ps(inv[r]);
    for (int j = 0; j < NV; ++j) {
      alignas(32) float t[8];
      _mm256_store_ps(t, _mm256_mul_ps(acc[r][j], ir));
      for (int e = 0; e < 8; ++e) out[r][d0 + 8 * j + e] = static_cast<scalar_t>(t[e]);
    }
  }
}

template <int RT, typename scalar_t>
void weighted_values_row_group(const float* const* p, const float* inv, const scalar_t* v, int64_t L, int64_t Dv, scalar_t* const* out) {
  int64_t d0 = 0;
  for (; d0 + 32 <= Dv; d0 += 32) weighted_values<RT, 4>(p, inv, v, L, Dv, d0, out);
  switch ((Dv - d0) / 8) {
    case 3: weighted_values<RT, 3>(p, inv, v, L, Dv, d0, out); break;
    case 2: weighted_values<RT, 2>(p, inv, v, L, Dv, d0, out); break;
    case 1: weighted_values<RT, 1>(p, inv, v, L, Dv, d0, out); break;
    default: break;
  }
}

// The AVX2 path for bf16 / float32 with D and Dv multiples of 8: query rows in groups of up to 3
// (3 x 4 accumulators), scores four keys at a time, the softmax, then the values 32 dimensions at a
// time; every key and value chunk is widened once per row group. BF16_DOT (bf16, D a multiple of 32,
// AVX-512 BF16 CPUs): the scores by scores_4keys_bf16.
template <bool BF16_DOT, typename scalar_t, typename mask_t>
__attribute__((target("avx2,fma"))) void attend_avx2(const scalar_t* q, const scalar_t* k, const scalar_t* v, const mask_t* const* mask_rows,
                                                   float scale, int64_t Lq, int64_t L, int64_t D, int64_t Dv, scalar_t* out,
                                                   std::vector<float>& work) {
  constexpr int kRows = 3;
  work.resize(Lq * D + Lq * L + Lq);
  float* qf = work.data();
  float* s = qf + Lq * D;
  float* inv = s + Lq * L;
  if (!BF16_DOT)
    for (int64_t i = 0; i < Lq * D; i += 8) _mm256_storeu_ps(qf + i, load8(q + i));
  for (int64_t l0 = 0; l0 < L; l0 += 4) {
    const int64_t nk = std::min<int64_t>(4, L - l0);
    bool any = false;
    for (int64_t l = l0; l < l0 + nk; ++l)
      for (int64_t i = 0; i < Lq; ++i) any |= !left_out(mask_rows[i], l);
    if (!any) {  // every row leaves these keys out: no need to read them
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t l = l0; l < l0 + nk; ++l) s[i * L + l] = kNegInf;
      continue;
    }
    const scalar_t* kl[4];
    for (int j = 0; j < 4; ++j) kl[j] = k + std::min(l0 + j, L - 1) * D;  // a short last block repeats its last key
    for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
      float dots[kRows][4];
#ifdef TME_AVX512_BF16
      if constexpr (BF16_DOT) {
        switch (std::min<int64_t>(kRows, Lq - i0)) {
          case 1: scores_4keys_bf16<1>(q + i0 * D, D, kl, dots); break;
          case 2: scores_4keys_bf16<2>(q + i0 * D, D, kl, dots); break;
          default: scores_4keys_bf16<3>(q + i0 * D, D, kl, dots); break;
        }
      } else
#endif
      {
        switch (std::min<int64_t>(kRows, Lq - i0)) {
          case 1: scores_4keys<1>(qf + i0 * D, D, kl, dots); break;
          case 2: scores_4keys<2>(qf + i0 * D, D, kl, dots); break;
          default: scores_4keys<3>(qf + i0 * D, D, kl, dots); break;
        }
      }
      for (int64_t r = 0; r < std::min<int64_t>(kRows, Lq - i0); ++r)
        for (int64_t j = 0; j < nk; ++j) s[(i0 + r) * L + l0 + j] = masked(mask_rows[i0 + r], l0 + j, dots[r][j] * scale);
    }
  }
  for (int64_t i = 0; i < Lq; ++i) {
    float* si = s + i * L;
    float mx = kNegInf;
    for (int64_t l = 0; l < L; ++l) mx = std::max(mx, si[l]);
    if (mx == kNegInf) {  // every key left out: zeros, as ATen
      std::fill(si, si + L, 0.0f);
      inv[i] = 0.0f;
      continue;
    }
    inv[i] = 1.0f / softmax_numerators_avx2(si, L, mx);
  }
  for (int64_t i0 = 0; i0 < Lq; i0 += kRows) {
    const float* p[kRows];
    scalar_t* o[kRows];
    const int64_t rows = std::min<int64_t>(kRows, Lq - i0);
    for (int64_t r = 0; r < rows; ++r) p[r] = s + (i0 + r) * L, o[r] = out + (i0 + r) * Dv;
    switch (rows) {
      case 1: weighted_values_row_group<1>(p, inv + i0, v, L, Dv, o); break;
      case 2: weighted_values_row_group<2>(p, inv + i0, v, L, Dv, o); break;
      default: weighted_values_row_group<3>(p, inv + i0, v, L, Dv, o); break;
    }
  }
}

// One (b, h): Lq query rows against L keys; mask_rows[i] is row i's mask ([L], bool or float32) or
// nullptr. AVX2 for bf16 / float32 with D and Dv multiples of 8; otherwise (float16, other widths, other
// CPUs) plain loops with std::exp.
template <typename scalar_t, typename mask_t>
void attend(int isa, const scalar_t* q, const scalar_t* k, const scalar_t* v, const mask_t* const* mask_rows, float scale,
            int64_t Lq, int64_t L, int64_t D, int64_t Dv, scalar_t* out, std::vector<float>& work) {
#ifdef TME_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (isa >= kIsaAvx512Bf16 && D % 32 == 0 && Dv % 8 == 0)
      return attend_avx2<true>(q, k, v, mask_rows, scale, Lq, L, D, Dv, out, work);
  }
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (isa >= kIsaAvx2 && D % 8 == 0 && Dv % 8 == 0) return attend_avx2<false>(q, k, v, mask_rows, scale, Lq, L, D, Dv, out, work);
  }
#endif
  work.resize(Lq * D + Lq * L + Lq * Dv + std::max(D, Dv));
  float* qf = work.data();
  float* s = qf + Lq * D;
  float* acc = s + Lq * L;
  float* row = acc + Lq * Dv;
  widen(q, qf, Lq * D);
  for (int64_t l = 0; l < L; ++l) {
    bool any = false;
    for (int64_t i = 0; i < Lq; ++i) any |= !left_out(mask_rows[i], l);
    if (any) widen(k + l * D, row, D);  // else every row leaves this key out: no need to read it
    for (int64_t i = 0; i < Lq; ++i) s[i * L + l] = any ? masked(mask_rows[i], l, dot_scalar(qf + i * D, row, D) * scale) : kNegInf;
  }
  std::vector<float> inv(Lq);
  for (int64_t i = 0; i < Lq; ++i) {
    float* si = s + i * L;
    const float mx = *std::max_element(si, si + L);
    if (mx == kNegInf) {  // every key left out: zeros, as ATen
      std::fill(si, si + L, 0.0f);
      inv[i] = 0.0f;
    } else {
      inv[i] = 1.0f / softmax_numerators_scalar(si, L, mx);
    }
  }
  std::fill(acc, acc + Lq * Dv, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    bool any = false;
    for (int64_t i = 0; i < Lq; ++i) any |= s[i * L + l] != 0.0f;
    if (!any) continue;
    widen(v + l * Dv, row, Dv);
    for (int64_t i = 0; i < Lq; ++i)
      if (s[i * L + l] != 0.0f) axpy_scalar(s[i * L + l], row, acc + i * Dv, Dv);
  }
  for (int64_t i = 0; i < Lq; ++i)
    for (int64_t j = 0; j < Dv; ++j) out[i * Dv + j] = static_cast<scalar_t>(acc[i * Dv + j] * inv[i]);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                            double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU tensors expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-D [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "decode_attention: q, k, v differ in dtype");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), L = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "decode_attention: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "decode_attention: v ", v.sizes(), " does not match k ", k.sizes());
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "decode_attention: the mask must be on the CPU");
    TORCH_CHECK(m.dim() <= 4, "decode_attention: the mask must have at most 4 dimensions");
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "decode_attention: the mask must be boolean (true: attend) or floating (added to the scores), got ", m.scalar_type());
    m = m.expand({B, H, Lq, L});  // checks broadcastability
    if (m.scalar_type() != at::kBool) m = m.to(at::kFloat);
    TORCH_CHECK(m.stride(3) == 1 || L == 1 || m.stride(3) == 0, "decode_attention: the mask's last dimension must be contiguous");
    if (m.stride(3) == 0 && L > 1) m = m.contiguous();
  }
  auto out = at::empty({B, H, Lq, Dv}, q.options());
  if (out.numel() == 0) return out;
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int isa = current_isa();
  const float sc = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
      std::vector<float> work;
      for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t qo = bh * Lq * D, ko = bh * L * D, vo = bh * L * Dv, oo = bh * Lq * Dv;
        if (!m.defined()) {
          std::vector<const bool*> rows(Lq, nullptr);
          attend<scalar_t, bool>(isa, qp + qo, kp + ko, vp + vo, rows.data(), sc, Lq, L, D, Dv, op + oo, work);
        } else if (m.scalar_type() == at::kBool) {
          std::vector<const bool*> rows(Lq);
          for (int64_t i = 0; i < Lq; ++i) rows[i] = m.data_ptr<bool>() + b * m.stride(0) + h * m.stride(1) + i * m.stride(2);
          attend<scalar_t, bool>(isa, qp + qo, kp + ko, vp + vo, rows.data(), sc, Lq, L, D, Dv, op + oo, work);
        } else {
          std::vector<const float*> rows(Lq);
          for (int64_t i = 0; i < Lq; ++i) rows[i] = m.data_ptr<float>() + b * m.stride(0) + h * m.stride(1) + i * m.stride(2);
          attend<scalar_t, float>(isa, qp + qo, kp + ko, vp + vo, rows.data(), sc, Lq, L, D, Dv, op + oo, work);
        }
      }
    });
  });
  return out;
}

// Test hook: force a narrower code path (0 scalar, 1 AVX2, 3 AVX-512 BF16 scores; -1 = best available). Returns the path now in use.
int64_t decode_attention_set_isa(int64_t isa) {
  g_isa_override.store(static_cast<int>(isa));
  return current_isa();
}

}  // namespace

namespace tme_ops {

void decode_attention_prefix_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length, double scale,
                                  at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "decode_attention_prefix: q [H, Lq, D], k and v [H, L, D] expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(), "decode_attention_prefix: contiguous tensors expected");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() && q.scalar_type() == out.scalar_type(),
              "decode_attention_prefix: q, k, v and out differ in dtype");
  const int64_t H = q.size(0), Lq = q.size(1), D = q.size(2), L = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(0) == H && v.size(0) == H && k.size(2) == D && v.size(1) == L, "decode_attention_prefix: q ", q.sizes(), ", k ",
              k.sizes(), " and v ", v.sizes(), " do not match");
  TORCH_CHECK(length >= 1 && length <= L, "decode_attention_prefix: ", length, " keys asked of a cache of ", L);
  TORCH_CHECK(out.numel() == H * Lq * Dv, "decode_attention_prefix: out has ", out.numel(), " elements, expected ", H * Lq * Dv);
  const int isa = current_isa();
  const float sc = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_prefix", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      std::vector<float> work;
      std::vector<const bool*> rows(Lq, nullptr);
      for (int64_t h = h0; h < h1; ++h)
        attend<scalar_t, bool>(isa, qp + h * Lq * D, kp + h * L * D, vp + h * L * Dv, rows.data(), sc, Lq, length, D, Dv,
                               op + h * Lq * Dv, work);
    });
  });
}

}  // namespace tme_ops

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) { m.def("_decode_attention_set_isa(int isa) -> int", &decode_attention_set_isa); }

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) { m.impl("decode_attention", &decode_attention); }
