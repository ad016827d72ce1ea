// Scaled dot-product attention for many query rows (prompts) on AVX-512 CPUs, flash-style:
//   out[b, h, i] = sum_l p[i, l] v[b, g(h), l] / sum_l p[i, l],   p[i, l] = exp(s[i, l] - max_l s[i, l]),
//   s[i, l] = scale * q[b, h, i] . k[b, g(h), l] + mask[i, l]
// for q [B, H, Lq, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] with H a multiple of Hkv (grouped query
// heads: head h reads key / value head g(h) = h / (H / Hkv)), and a boolean (keep) or additive mask
// broadcastable to [B, H, Lq, L], or none, or causal (key l <= query i, SDPA's top-left alignment).
// A row whose keys are all left out gives zeros (as ATen's CPU flash attention).
//
// The CPU kernel of torchao_mx_ext::prompt_attention; the operator (schema, fake kernel, pure-torch
// fallback) is defined in Python: torchao_mx_ext/kernels/cpu_prompt_attention.py.
//
// Why: ATen's CPU flash attention runs a SmolLM2-135M prompt's attention (9 heads x 512 rows, 544 cached
// keys, bf16) at about 10.5 ms a layer on a Zen 4 core without AMX, a third of a W4A4 prefill, whatever
// the mask (causal blocks are not skipped). Here, per key / value head: K is widened to float32 and
// transposed once ([D][L]), V widened once; then blocks of R query rows sweep the keys 16 at a time:
// scores as R x 16 float32 lanes (one FMA per row and dimension, the query element broadcast), the
// online softmax (running maximum and sum per row, the accumulated output rescaled when the maximum
// grows), and the output accumulated in registers (R rows x Dv / 16 registers). Key blocks that the
// mask (or causality) leaves out for all R rows are skipped, so a causal prompt costs half.
//
// Numbers: q, k, v widened to float32; scores, softmax and the weighted sum in float32 (the weights
// are not rounded to bf16 before the product with v, as ATen's bf16 flash attention rounds them),
// exp by a polynomial (about 2 float32 ulps; weights below e^-87 of the row's running maximum are 0),
// the output rounded once to q's dtype. Summation order differs from ATen's.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kKeys = 16;  // keys per block: one register of scores per row
constexpr int64_t kChunkRows = 64;  // query rows of a head per parallel task (a multiple of every row block)

#ifdef TME_X86_SIMD
#define TME_PROMPT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma"

// exp(x) for x <= 0 (tme_cpu's Cephes expf, as decode_attention.cpp's AVX2 version); x < -87 (masked
// keys at -inf included) gives 0.
__attribute__((target(TME_PROMPT_TARGET))) inline __m512 exp_nonpositive_avx512(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(tme_cpu::kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(tme_cpu::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(tme_cpu::kLn2Lo), r);
  __m512 y = _mm512_set1_ps(tme_cpu::kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(tme_cpu::kExpPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~tiny), y, _mm512_castsi512_ps(pow2n));
}

// Where a row's mask lets keys l0 .. l0 + 15 in (bit j: key l0 + j), and the additive part (0 for
// boolean masks and none). Keys at or past L are left out.
template <typename mask_t>
__attribute__((target(TME_PROMPT_TARGET))) inline __mmask16 mask_block(const mask_t* m, bool causal, int64_t row, int64_t l0, int64_t L,
                                                                        __m512* add) {
  const int64_t n = std::min<int64_t>(kKeys, L - l0);
  __mmask16 keep = n >= kKeys ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  *add = _mm512_setzero_ps();
  if (causal) {
    const int64_t last = row - l0;  // keys l0 + j with j <= last
    keep &= last >= kKeys - 1 ? __mmask16(0xFFFF) : (last < 0 ? __mmask16(0) : static_cast<__mmask16>((1u << (last + 1)) - 1));
  } else if (m != nullptr) {
    if constexpr (std::is_same_v<mask_t, bool>) {
      const __m128i b = _mm_maskz_loadu_epi8(keep, reinterpret_cast<const uint8_t*>(m + l0));
      keep &= _mm_test_epi8_mask(b, b);
    } else {
      *add = _mm512_maskz_loadu_ps(keep, m + l0);
      keep &= _mm512_cmp_ps_mask(*add, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
    }
  }
  return keep;
}

#ifdef TME_AVX512_BF16
#define TME_PROMPT_SCORES_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"
#else
#define TME_PROMPT_SCORES_TARGET TME_PROMPT_TARGET
#endif

// Query rows i0 .. i0 + R - 1 of one head against the L keys (Lp: L rounded up to whole blocks; keys
// past L are zeros); NV = Dv / 16. Scores: float32 FMAs over kt [D][Lp] (widened keys) with qf [R][D]
// (widened queries), or, BF16_DOT (bf16 inputs on AVX-512 BF16 CPUs), vdpbf16ps over pairs of
// dimensions: kt then holds bf16 pairs [D/2][Lp][2] and qf the rows' bf16 pairs as 32-bit words
// (exact products, float32 sums; half the instructions).
template <bool BF16_DOT, int R, int NV, typename mask_t, typename scalar_t>
__attribute__((target(TME_PROMPT_SCORES_TARGET))) void rows_block(const float* qf, const float* kt, const float* vf,
                                                                   const mask_t* const* mrows, bool causal, float scale, int64_t i0,
                                                                   int64_t L, int64_t Lp, int64_t D, scalar_t* out) {
  constexpr int64_t Dv = NV * 16;
  __m512 acc[R][NV];
  float mx[R], sum[R];
  for (int r = 0; r < R; ++r) {
    mx[r] = kNegInf;
    sum[r] = 0.0f;
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  alignas(64) float p[R][kKeys];
  for (int64_t l0 = 0; l0 < L; l0 += kKeys) {
    __mmask16 keep[R];
    __m512 add[R];
    __mmask16 any = 0;
    for (int r = 0; r < R; ++r) any |= keep[r] = mask_block(mrows[r], causal, i0 + r, l0, L, &add[r]);
    if (!any) continue;  // every row leaves these keys out: not read
    __m512 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
#ifdef TME_AVX512_BF16
    if constexpr (BF16_DOT) {
      const uint32_t* qp = reinterpret_cast<const uint32_t*>(qf);
      for (int64_t dp = 0; dp < D / 2; ++dp) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kt + dp * Lp + l0);  // 16 keys x 2 dimensions
        for (int r = 0; r < R; ++r) s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[r * D / 2 + dp])), kv);
      }
    } else
#endif
    {
      for (int64_t d = 0; d < D; ++d) {
        const __m512 kv = _mm512_loadu_ps(kt + d * Lp + l0);
        for (int r = 0; r < R; ++r) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(qf[r * D + d]), kv, s[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (!keep[r]) {
        std::memset(p[r], 0, sizeof(p[r]));
        continue;
      }
      const __m512 sc = _mm512_mask_blend_ps(keep[r], _mm512_set1_ps(kNegInf), _mm512_add_ps(_mm512_mul_ps(s[r], _mm512_set1_ps(scale)), add[r]));
      const float new_mx = std::max(mx[r], _mm512_reduce_max_ps(sc));
      const __m512 pr = exp_nonpositive_avx512(_mm512_sub_ps(sc, _mm512_set1_ps(new_mx)));
      if (new_mx > mx[r]) {  // rescale what was accumulated under the old maximum (exp(-inf) = 0 at the start)
        const float c = mx[r] == kNegInf ? 0.0f : std::exp(mx[r] - new_mx);
        sum[r] *= c;
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_mul_ps(acc[r][j], _mm512_set1_ps(c));
        mx[r] = new_mx;
      }
      sum[r] += _mm512_reduce_add_ps(pr);
      _mm512_store_ps(p[r], pr);
    }
    const int64_t n = std::min<int64_t>(kKeys, L - l0);
    for (int64_t j = 0; j < n; ++j) {
      const float* vl = vf + (l0 + j) * Dv;
      __m512 vv[NV];
      for (int t = 0; t < NV; ++t) vv[t] = _mm512_loadu_ps(vl + 16 * t);
      for (int r = 0; r < R; ++r) {
        const __m512 pr = _mm512_set1_ps(p[r][j]);
        for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_fmadd_ps(pr, vv[t], acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;  // every key left out: zeros, as ATen
    alignas(64) float t[Dv];
    for (int j = 0; j < NV; ++j) _mm512_store_ps(t + 16 * j, _mm512_mul_ps(acc[r][j], _mm512_set1_ps(inv)));
    for (int64_t e = 0; e < Dv; ++e) out[r * Dv + e] = static_cast<scalar_t>(t[e]);
  }
}

// The bits of a bf16 value (0 for other types, whose instantiations never reach the bf16 path).
template <typename T>
inline uint16_t bf16_bits(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return v.x;
  } else {
    return 0;
  }
}

// One (b, h): Lq query rows against the prepared keys kt (see rows_block) and values vf [L][Dv].
// Query rows row0 .. row0 + Lq - 1 of the head (q, out and mrows start at row0).
template <bool BF16_DOT, int NV, typename mask_t, typename scalar_t>
void attend_head(const scalar_t* q, const float* kt, const float* vf, const mask_t* const* mrows, bool causal, float scale, int64_t row0,
                 int64_t Lq, int64_t L, int64_t Lp, int64_t D, scalar_t* out, std::vector<float>& qf) {
  constexpr int R = NV <= 4 ? 4 : 2;  // R x NV output registers, R score registers
  constexpr int64_t Dv = NV * 16;
  qf.resize(R * D);
  for (int64_t i0 = 0; i0 < Lq; i0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, Lq - i0));
    if constexpr (BF16_DOT) {  // the bf16 bits as they are, two to a 32-bit word
      uint16_t* qb = reinterpret_cast<uint16_t*>(qf.data());
      for (int r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) qb[r * D + d] = r < rows ? bf16_bits(q[(i0 + r) * D + d]) : 0;
    } else {
      for (int r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = r < rows ? static_cast<float>(q[(i0 + r) * D + d]) : 0.0f;
    }
    const mask_t* m[R];
    for (int r = 0; r < R; ++r) m[r] = mrows[std::min<int64_t>(i0 + r, Lq - 1)];
    if (rows == R) {
      rows_block<BF16_DOT, R, NV>(qf.data(), kt, vf, m, causal, scale, row0 + i0, L, Lp, D, out + i0 * Dv);
      continue;
    }
    // A short last block: computed as a full one into a scratch output (the extra rows repeat the last).
    alignas(64) scalar_t tail[R * Dv];
    rows_block<BF16_DOT, R, NV>(qf.data(), kt, vf, m, causal, scale, row0 + i0, L, Lp, D, tail);
    std::memcpy(out + i0 * Dv, tail, rows * Dv * sizeof(scalar_t));
  }
}
#endif  // TME_X86_SIMD

at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                            double scale, bool is_causal) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "prompt_attention: CPU tensors expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prompt_attention: q, k, v must be 4-D [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "prompt_attention: q, k, v differ in dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "prompt_attention: float32 or bfloat16 inputs expected");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0, "prompt_attention: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == Hkv && v.size(2) == L, "prompt_attention: v ", v.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(D % 16 == 0 && (Dv == 64 || Dv == 128), "prompt_attention: D must be a multiple of 16 and Dv 64 or 128, got ", D, ", ", Dv);
  TORCH_CHECK(!(is_causal && mask.has_value()), "prompt_attention: a mask and is_causal together");
  TORCH_CHECK(tme_cpu::detected_isa() >= tme_cpu::kIsaAvx512 && tme_cpu::has_avx512_bw(), "prompt_attention: needs an AVX-512 CPU");
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.dim() <= 4, "prompt_attention: the mask must be a CPU tensor of at most 4 dimensions");
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "prompt_attention: the mask must be boolean (true: attend) or floating (added to the scores), got ", m.scalar_type());
    m = m.expand({B, H, Lq, L});  // checks broadcastability
    if (m.scalar_type() != at::kBool) m = m.to(at::kFloat);
    if (m.stride(3) != 1 && L > 1) m = m.contiguous();
  }
  auto out = at::empty({B, H, Lq, Dv}, q.options());
  if (out.numel() == 0) return out;
#ifdef TME_X86_SIMD
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t groups = H / Hkv, Lp = (L + kKeys - 1) / kKeys * kKeys;
  const float sc = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "prompt_attention", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
    const bool bf16_dot = kBf16 && tme_cpu::detected_isa() >= tme_cpu::kIsaAvx512Bf16;
    // Keys and values prepared once per key/value head, then (head, chunk of query rows) tasks: a causal
    // prompt's late rows cost more than its early ones, and every head has both, so the tasks spread
    // evenly over threads.
    std::vector<float> kt_all(B * Hkv * D * Lp), vf_all(B * Hkv * Lp * Dv);
    at::parallel_for(0, B * Hkv, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t bg = g0; bg < g1; ++bg) {
        const scalar_t* kh = kp + bg * L * D;
        const scalar_t* vh = vp + bg * L * Dv;
        float* kt = kt_all.data() + bg * D * Lp;
        float* vf = vf_all.data() + bg * Lp * Dv;
        if constexpr (kBf16) {
          if (bf16_dot) {  // keys as bf16 pairs [D/2][Lp][2], zeros past L (left out by every mask)
            uint16_t* kb = reinterpret_cast<uint16_t*>(kt);
            for (int64_t dp = 0; dp < D / 2; ++dp)
              for (int64_t l = 0; l < Lp; ++l)
                for (int t = 0; t < 2; ++t) kb[(dp * Lp + l) * 2 + t] = l < L ? bf16_bits(kh[l * D + 2 * dp + t]) : 0;
          }
        }
        if (!bf16_dot) {
          for (int64_t l = 0; l < Lp; ++l)  // keys transposed, zeros past L (left out by every mask)
            for (int64_t d = 0; d < D; ++d) kt[d * Lp + l] = l < L ? static_cast<float>(kh[l * D + d]) : 0.0f;
        }
        if constexpr (kBf16) {
          tme_cpu::widen_bf16(reinterpret_cast<const uint16_t*>(vh), vf, L * Dv);
        } else {
          for (int64_t i = 0; i < L * Dv; ++i) vf[i] = static_cast<float>(vh[i]);
        }
        std::fill(vf + L * Dv, vf + Lp * Dv, 0.0f);  // values past L: zeros (their weights are 0 too)
      }
    });
    const int64_t chunks = (Lq + kChunkRows - 1) / kChunkRows;
    at::parallel_for(0, B * H * chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> qf;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t bh = task / chunks, b = bh / H, h = bh % H, row0 = (task % chunks) * kChunkRows;
        const int64_t rows = std::min(kChunkRows, Lq - row0), bg = b * Hkv + h / groups;
        const float* kt = kt_all.data() + bg * D * Lp;
        const float* vf = vf_all.data() + bg * Lp * Dv;
        const scalar_t* qh = qp + (bh * Lq + row0) * D;
        scalar_t* oh = op + (bh * Lq + row0) * Dv;
        auto run = [&](auto mask_rows) {
          if (bf16_dot) {
            if (Dv == 64) attend_head<kBf16, 4>(qh, kt, vf, mask_rows.data(), is_causal, sc, row0, rows, L, Lp, D, oh, qf);
            else attend_head<kBf16, 8>(qh, kt, vf, mask_rows.data(), is_causal, sc, row0, rows, L, Lp, D, oh, qf);
          } else if (Dv == 64) {
            attend_head<false, 4>(qh, kt, vf, mask_rows.data(), is_causal, sc, row0, rows, L, Lp, D, oh, qf);
          } else {
            attend_head<false, 8>(qh, kt, vf, mask_rows.data(), is_causal, sc, row0, rows, L, Lp, D, oh, qf);
          }
        };
        if (m.defined() && m.scalar_type() == at::kFloat) {
          std::vector<const float*> mrows(rows);
          for (int64_t i = 0; i < rows; ++i) mrows[i] = m.data_ptr<float>() + b * m.stride(0) + h * m.stride(1) + (row0 + i) * m.stride(2);
          run(mrows);
        } else {
          std::vector<const bool*> mrows(rows, nullptr);
          if (m.defined())
            for (int64_t i = 0; i < rows; ++i) mrows[i] = m.data_ptr<bool>() + b * m.stride(0) + h * m.stride(1) + (row0 + i) * m.stride(2);
          run(mrows);
        }
      }
    });
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchao_mx_ext, CPU, m) { m.impl("prompt_attention", &prompt_attention); }
