// One batch-1 decode step of a Llama-family decoder as one call: torch.classes.torchao_mx_ext.DecoderStep.
//
// For a token t at position p (the static KV cache's length), with x_0 = E[t]:
//   per layer:  h = RMSNorm(x) ; q, k, v = h Wq, h Wk, h Wv ; q, k = RoPE_p(q), RoPE_p(k)
//               (Qwen3: q, k = RoPE_p(RMSNorm_head(q)), RoPE_p(RMSNorm_head(k)), per head)
//               K[:, p] = k ; V[:, p] = v ; a = softmax(scale q K[:, :p+1]^T) V[:, :p+1] (grouped heads)
//               x = x + a Wo ; h = RMSNorm(x) ; x = x + (silu(h Wg) * (h Wu)) Wd
//   logits = RMSNorm(x) W_head
// with every layer's cache length then advanced by one: transformers' LlamaDecoderLayer / LlamaModel
// (Mistral and Qwen2 are the same layer, Qwen2's q/k/v biases are linear biases; Qwen3 adds the
// per-head q/k norms) over a StaticCache.
//
// Why: a compiled decode step of a small model (SmolLM2-135M) makes a few hundred operator calls
// through Dynamo's guards and Inductor's Python wrapper, a third of the step on a Zen 4 core, where
// each call pays cold caches after the weights streamed through them. Here the step is one call; the
// linears run the same kernels as the operators (cpu_ops.h: the MXFP4 GEMV with its fused input
// transform, the int8 GEMV, the decode attention; dense linears through at::linear) and the
// elementwise parts are small loops.
//
// Numbers, in the model dtype T (bf16, fp16 or float32), rounding where eager PyTorch rounds:
//   RMSNorm: float32 mean of squares (summation order differs from ATen's), x * 1/sqrt(var + eps)
//     rounded to T, times the weight rounded to T;
//   RoPE: q * cos and rotate_half(q) * sin each rounded to T, their sum rounded to T (cos / sin are the
//     model's own rotary tables in T, computed by the caller for every position);
//   SiLU: g / (1 + exp(-g)) in float32 with a polynomial exp (a few ulps; the compiled and eager paths
//     use SLEEF's), rounded to T, times up rounded to T; residual adds rounded to T;
//   attention: float32 scores, softmax and sum, output rounded to T (decode_attention's numbers).
// The linears' numbers are their operators' (same calls).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "cpu_ops.h"
#include "mxfp4_fake_quantize.h"

namespace {

enum class Kind { Dense, Mxfp4, Int8 };

struct Linear {
  Kind kind;
  at::Tensor a, b;                      // dense: weight; MXFP4: qdata, scale; int8: qweight, scales
  c10::optional<at::Tensor> bias;       // in the dtype the module's own forward passes to its kernel
  c10::optional<at::Tensor> rotation;   // MXFP4: the b x b float32 block of R (or none)
  int64_t block_size = 32;
  double multiplier = 1.0;
  std::optional<std::string> act_rule;  // MXFP4: the activation rule (W4A4), none for weight-only
  int64_t in_features = 0, out_features = 0;
};

// Linears reading one input (q/k/v, gate/up, or one alone), run as one mxfp4_gemv_group call where all
// are MXFP4 with one block size, multiplier and activation rule (the input is then prepared once).
struct Group {
  std::vector<int64_t> ids;
  bool fused = false;
  std::vector<at::Tensor> qdata, scale, outs;
  c10::List<c10::optional<at::Tensor>> bias, rotation;
  // Weight-only MXFP4 with a rotation: the input is rotated in float32 and rounded to T first (what
  // RotatedMXFP4Tensor.linear does), into `rounded`, and the GEMVs take no rotation.
  c10::optional<at::Tensor> pre_rotation;
  at::Tensor rounded;
};

struct Layer {
  at::Tensor in_norm, post_norm;
  double in_eps = 1e-6, post_eps = 1e-6;
  Group qkv, o, gate_up, down;
  at::Tensor q_packed;  // q's output viewed as [H_kv, g, D]: the query heads of each key/value head
  c10::optional<at::Tensor> q_norm, k_norm;  // Qwen3: RMSNorm weights [D] over each head before RoPE
  double qk_eps = 1e-6;
  at::Tensor k_cache, v_cache, length;  // [H_kv, L, D] views of the bound cache, its length (int64 scalar)
};

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T narrow(float v) {
  return static_cast<T>(v);  // c10's round to nearest even for bf16 / fp16
}

// out = weight * (x / sqrt(mean(x^2) + eps) rounded to T), rounded to T (out may be x).
template <typename T>
void rms_norm(const T* x, const T* weight, T* out, int64_t n, float eps) {
  float part[16] = {0.0f};
  for (int64_t i = 0; i < n; ++i) {
    const float v = widen(x[i]);
    part[i % 16] += v * v;
  }
  float sum = 0.0f;
  for (float s : part) sum += s;
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(widen(weight[i]) * widen(narrow<T>(widen(x[i]) * inv)));
}

// x[h, :] <- x[h, :] * cos + rotate_half(x[h, :]) * sin for each of `heads` heads of width d.
template <typename T>
void rope(T* x, int64_t heads, int64_t d, const T* cos, const T* sin) {
  const int64_t half = d / 2;
  std::vector<float> row(d);
  for (int64_t h = 0; h < heads; ++h) {
    T* xh = x + h * d;
    for (int64_t i = 0; i < d; ++i) row[i] = widen(xh[i]);
    for (int64_t i = 0; i < d; ++i) {
      const float rotated = i < half ? -row[i + half] : row[i - half];
      xh[i] = narrow<T>(widen(narrow<T>(row[i] * widen(cos[i]))) + widen(narrow<T>(rotated * widen(sin[i]))));
    }
  }
}

// silu(g) = g / (1 + exp(-g)), as g / (1 + e) for g >= 0 and g e / (1 + e) otherwise, e = exp(-|g|).
#ifdef TME_X86_SIMD
__attribute__((target("avx2,fma"))) void silu_f32(const float* g, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    const __m256 e = tme_cpu::exp_nonpositive_avx2(_mm256_or_ps(v, sign));  // exp(-|g|)
    const __m256 num = _mm256_blendv_ps(v, _mm256_mul_ps(v, e), v);  // sign bit set: g e
    _mm256_storeu_ps(out + i, _mm256_div_ps(num, _mm256_add_ps(one, e)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i]));
}
#endif

template <typename T>
void silu_mul(const T* gate, const T* up, T* out, int64_t n, std::vector<float>& work) {
  work.resize(2 * n);
  float* g = work.data();
  float* s = g + n;
  for (int64_t i = 0; i < n; ++i) g[i] = widen(gate[i]);
#ifdef TME_X86_SIMD
  if (tme_cpu::detected_isa() >= tme_cpu::kIsaAvx2) {
    silu_f32(g, s, n);
  } else
#endif
  {
    for (int64_t i = 0; i < n; ++i) s[i] = g[i] / (1.0f + std::exp(-g[i]));
  }
  for (int64_t i = 0; i < n; ++i) out[i] = narrow<T>(widen(narrow<T>(s[i])) * widen(up[i]));
}

template <typename T>
void add_into(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = narrow<T>(widen(x[i]) + widen(y[i]));
}

c10::optional<c10::string_view> rule_view(const std::optional<std::string>& rule) {
  if (!rule.has_value()) return c10::nullopt;
  return c10::string_view(*rule);
}

// The engine. Built once per model (torchao_mx_ext/decoder_step.py: what it takes from the model and
// when it applies), bound to a StaticCache's tensors, then `step(token)` per generated token.
struct DecoderStep : torch::CustomClassHolder {
  int64_t hidden, heads, kv_heads, head_dim;
  double attn_scale;
  at::ScalarType dtype = at::kBFloat16;
  at::Tensor embedding, final_norm, rope_cos, rope_sin;  // [V, hidden]; [hidden]; [P, head_dim] x2 (set_rope)
  double final_eps = 1e-6;
  std::vector<Linear> linears;
  std::vector<Layer> layers;
  Group head;
  at::Tensor x, h, attn, attn_flat;  // [1, 1, hidden] x2; [H_kv, g, D] and its [1, 1, H D] view
  bool bound = false;
  std::vector<float> work;

  DecoderStep(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, double attn_scale)
      : hidden(hidden), heads(heads), kv_heads(kv_heads), head_dim(head_dim), attn_scale(attn_scale) {
    TORCH_CHECK(hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0 && head_dim % 2 == 0,
                "DecoderStep: bad shape (hidden ", hidden, ", heads ", heads, ", kv heads ", kv_heads, ", head dim ", head_dim, ")");
  }

  // The embedding table fixes the model dtype; set it first.
  void set_embedding(const at::Tensor& table) {
    TORCH_CHECK(table.dim() == 2 && table.size(1) == hidden && table.device().is_cpu(), "DecoderStep: embedding [V, ", hidden, "] expected");
    const at::ScalarType t = table.scalar_type();
    TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf || t == at::kFloat, "DecoderStep: bf16, fp16 or float32 models only");
    dtype = t;
    embedding = table.contiguous();
    const auto opts = table.options();
    x = at::empty({1, 1, hidden}, opts);
    h = at::empty({1, 1, hidden}, opts);
    attn = at::empty({kv_heads, heads / kv_heads, head_dim}, opts);
    attn_flat = attn.view({1, 1, heads * head_dim});
  }

  // The rotary tables cos, sin [P, head_dim] for positions 0 .. P - 1, in the model dtype.
  void set_rope(const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(embedding.defined(), "DecoderStep: set_embedding first");
    TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == head_dim && cos.scalar_type() == dtype &&
                    sin.scalar_type() == dtype,
                "DecoderStep: rotary tables [P, ", head_dim, "] in the model dtype expected");
    rope_cos = cos.contiguous();
    rope_sin = sin.contiguous();
  }

  int64_t add_linear(Linear l) {
    linears.push_back(std::move(l));
    return static_cast<int64_t>(linears.size()) - 1;
  }

  int64_t add_dense(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dtype, "DecoderStep: dense weight in the model dtype expected");
    Linear l{Kind::Dense, weight, {}, bias};
    l.in_features = weight.size(1);
    l.out_features = weight.size(0);
    return add_linear(std::move(l));
  }

  int64_t add_int8(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "DecoderStep: int8 weight expected");
    Linear l{Kind::Int8, qweight, scales, bias};
    l.in_features = qweight.size(1);
    l.out_features = qweight.size(0);
    return add_linear(std::move(l));
  }

  int64_t add_mxfp4(const at::Tensor& qdata, const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& rotation, int64_t block_size, double multiplier,
                    const c10::optional<std::string>& act_rule) {
    TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kByte && scale.dim() == 2, "DecoderStep: MXFP4 codes [N, K/2] expected");
    Linear l{Kind::Mxfp4, qdata.contiguous(), scale.contiguous(), bias, rotation, block_size, multiplier};
    if (act_rule.has_value()) l.act_rule = *act_rule;
    l.in_features = qdata.size(1) * 2;
    l.out_features = qdata.size(0);
    return add_linear(std::move(l));
  }

  Group make_group(const std::vector<int64_t>& ids) {
    Group g;
    g.ids = ids;
    TORCH_CHECK(!ids.empty(), "DecoderStep: an empty group");
    for (int64_t id : ids) TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(linears.size()), "DecoderStep: no linear ", id);
    const Linear& first = linears[ids[0]];
    g.fused = true;
    for (int64_t id : ids) {
      const Linear& l = linears[id];
      TORCH_CHECK(l.in_features == first.in_features, "DecoderStep: linears of one group differ in input width");
      g.fused = g.fused && l.kind == Kind::Mxfp4 && l.block_size == first.block_size && l.multiplier == first.multiplier &&
                l.act_rule == first.act_rule;
    }
    if (g.fused && !first.act_rule.has_value() && first.rotation.has_value()) {
      for (int64_t id : ids) g.fused = g.fused && linears[id].rotation.has_value() && linears[id].rotation->equal(*first.rotation);
      if (g.fused) {
        g.pre_rotation = first.rotation;
        g.rounded = at::empty({1, 1, first.in_features}, embedding.options());
      }
    }
    for (int64_t id : ids) {
      const Linear& l = linears[id];
      g.outs.push_back(at::empty({1, 1, l.out_features}, embedding.options()));
      if (!g.fused) continue;
      g.qdata.push_back(l.a);
      g.scale.push_back(l.b);
      g.bias.push_back(l.bias);
      g.rotation.push_back(g.pre_rotation.has_value() ? c10::optional<at::Tensor>() : l.rotation);
    }
    return g;
  }

  void add_layer(const at::Tensor& in_norm, double in_eps, const at::Tensor& post_norm, double post_eps, std::vector<int64_t> qkv,
                 int64_t o, std::vector<int64_t> gate_up, int64_t down, const c10::optional<at::Tensor>& q_norm,
                 const c10::optional<at::Tensor>& k_norm, double qk_eps) {
    TORCH_CHECK(embedding.defined(), "DecoderStep: set_embedding first");
    TORCH_CHECK(qkv.size() == 3 && gate_up.size() == 2, "DecoderStep: q/k/v and gate/up linears expected");
    const int64_t qd = heads * head_dim, kvd = kv_heads * head_dim;
    TORCH_CHECK(linears.at(qkv[0]).out_features == qd && linears.at(qkv[1]).out_features == kvd && linears.at(qkv[2]).out_features == kvd &&
                    linears.at(qkv[0]).in_features == hidden && linears.at(o).in_features == qd && linears.at(o).out_features == hidden,
                "DecoderStep: attention projections do not match the shape");
    TORCH_CHECK(linears.at(gate_up[0]).out_features == linears.at(gate_up[1]).out_features &&
                    linears.at(down).in_features == linears.at(gate_up[0]).out_features && linears.at(down).out_features == hidden &&
                    linears.at(gate_up[0]).in_features == hidden,
                "DecoderStep: MLP projections do not match the shape");
    TORCH_CHECK(in_norm.numel() == hidden && post_norm.numel() == hidden && in_norm.scalar_type() == dtype && post_norm.scalar_type() == dtype,
                "DecoderStep: norm weights [", hidden, "] in the model dtype expected");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecoderStep: q and k norms come together");
    if (q_norm.has_value()) {
      TORCH_CHECK(q_norm->numel() == head_dim && k_norm->numel() == head_dim && q_norm->scalar_type() == dtype &&
                      k_norm->scalar_type() == dtype,
                  "DecoderStep: q/k norm weights [", head_dim, "] in the model dtype expected");
    }
    Layer layer;
    if (q_norm.has_value()) {
      layer.q_norm = q_norm->contiguous();
      layer.k_norm = k_norm->contiguous();
      layer.qk_eps = qk_eps;
    }
    layer.in_norm = in_norm.contiguous();
    layer.post_norm = post_norm.contiguous();
    layer.in_eps = in_eps;
    layer.post_eps = post_eps;
    layer.qkv = make_group(qkv);
    layer.q_packed = layer.qkv.outs[0].view({kv_heads, heads / kv_heads, head_dim});
    layer.o = make_group({o});
    layer.gate_up = make_group(gate_up);
    layer.down = make_group({down});
    layers.push_back(std::move(layer));
    bound = false;
  }

  void set_head(const at::Tensor& norm, double eps, int64_t head_id) {
    TORCH_CHECK(norm.numel() == hidden && norm.scalar_type() == dtype, "DecoderStep: final norm [", hidden, "] expected");
    TORCH_CHECK(linears.at(head_id).in_features == hidden, "DecoderStep: the head's input width is not ", hidden);
    final_norm = norm.contiguous();
    final_eps = eps;
    head = make_group({head_id});
  }

  // The cache's per-layer keys / values [1, H_kv, L, D] and lengths (int64 scalars), written in place.
  void bind_cache(std::vector<at::Tensor> keys, std::vector<at::Tensor> values, std::vector<at::Tensor> lengths) {
    TORCH_CHECK(keys.size() == layers.size() && values.size() == layers.size() && lengths.size() == layers.size(),
                "DecoderStep: one key, value and length tensor per layer expected");
    for (size_t i = 0; i < layers.size(); ++i) {
      const at::Tensor& k = keys[i];
      const at::Tensor& v = values[i];
      TORCH_CHECK(k.dim() == 4 && k.size(0) == 1 && k.size(1) == kv_heads && k.size(3) == head_dim && k.is_contiguous() &&
                      k.scalar_type() == dtype && v.sizes() == k.sizes() && v.is_contiguous() && v.scalar_type() == dtype,
                  "DecoderStep: layer ", i, ": a batch-1 cache [1, ", kv_heads, ", L, ", head_dim, "] in the model dtype expected, got ",
                  k.sizes());
      TORCH_CHECK(lengths[i].numel() == 1 && lengths[i].scalar_type() == at::kLong && lengths[i].device().is_cpu(),
                  "DecoderStep: cache lengths must be int64 CPU scalars");
      layers[i].k_cache = k[0];
      layers[i].v_cache = v[0];
      layers[i].length = lengths[i];
    }
    bound = true;
  }

  // Runs group g on input in ([1, 1, K] in T); outputs in g.outs (head: fresh tensors).
  void run(Group& g, const at::Tensor& in, bool fresh = false) {
    if (fresh) {
      for (auto& out : g.outs) out = at::empty_like(out);
    }
    if (g.fused) {
      const Linear& first = linears[g.ids[0]];
      const at::Tensor* src = &in;
      if (g.pre_rotation.has_value()) {
        // Weight-only with a rotation: x R in float32 (the input transform's own function), rounded to T.
        const int64_t K = first.in_features;
        work.resize(2 * K);
        float* xf = work.data();
        float* xr = xf + K;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "decoder_step_rotate", [&] {
          const scalar_t* xs = in.data_ptr<scalar_t>();
          for (int64_t i = 0; i < K; ++i) xf[i] = widen(xs[i]);
          tme_cpu::rotate_fake_quantize_rows(xf, xr, 1, K, first.block_size, &*g.pre_rotation, "none");
          scalar_t* dst = g.rounded.data_ptr<scalar_t>();
          for (int64_t i = 0; i < K; ++i) dst[i] = narrow<scalar_t>(xr[i]);
        });
        src = &g.rounded;
      }
      tme_ops::mxfp4_gemv_group_into(*src, g.qdata, g.scale, first.block_size, first.multiplier, g.bias, g.rotation,
                                     rule_view(first.act_rule), g.outs);
      return;
    }
    for (size_t i = 0; i < g.ids.size(); ++i) {
      const Linear& l = linears[g.ids[i]];
      at::Tensor y;
      switch (l.kind) {
        case Kind::Dense:
          y = at::linear(in, l.a, l.bias);
          break;
        case Kind::Int8:
          y = tme_ops::int8_gemv(in, l.a, l.b, l.bias, c10::nullopt);
          break;
        case Kind::Mxfp4:
          y = tme_ops::mxfp4_gemv(in, l.a, l.b, l.block_size, l.multiplier, l.bias, dtype, l.rotation, rule_view(l.act_rule));
          break;
      }
      // Into the group's own buffer: views of it (the packed query) are taken once.
      if (fresh) {
        g.outs[i] = y;
      } else {
        g.outs[i].copy_(y);
      }
    }
  }

  template <typename T>
  at::Tensor step_as(int64_t token, int64_t pos) {
    const int64_t D = head_dim;
    std::memcpy(x.data_ptr<T>(), embedding.data_ptr<T>() + token * hidden, hidden * sizeof(T));
    T* xp = x.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    const T* cos = rope_cos.data_ptr<T>() + pos * D;
    const T* sin = rope_sin.data_ptr<T>() + pos * D;
    for (Layer& layer : layers) {
      rms_norm(xp, layer.in_norm.data_ptr<T>(), hp, hidden, static_cast<float>(layer.in_eps));
      run(layer.qkv, h);
      T* q = layer.qkv.outs[0].data_ptr<T>();
      T* k = layer.qkv.outs[1].data_ptr<T>();
      const T* v = layer.qkv.outs[2].data_ptr<T>();
      if (layer.q_norm.has_value()) {
        const float eps = static_cast<float>(layer.qk_eps);
        for (int64_t hq = 0; hq < heads; ++hq) rms_norm(q + hq * D, layer.q_norm->data_ptr<T>(), q + hq * D, D, eps);
        for (int64_t hk = 0; hk < kv_heads; ++hk) rms_norm(k + hk * D, layer.k_norm->data_ptr<T>(), k + hk * D, D, eps);
      }
      rope(q, heads, D, cos, sin);
      rope(k, kv_heads, D, cos, sin);
      const int64_t L = layer.k_cache.size(1);
      T* kc = layer.k_cache.data_ptr<T>();
      T* vc = layer.v_cache.data_ptr<T>();
      for (int64_t hk = 0; hk < kv_heads; ++hk) {
        std::memcpy(kc + (hk * L + pos) * D, k + hk * D, D * sizeof(T));
        std::memcpy(vc + (hk * L + pos) * D, v + hk * D, D * sizeof(T));
      }
      tme_ops::decode_attention_prefix_into(layer.q_packed, layer.k_cache, layer.v_cache, pos + 1, attn_scale, attn);
      run(layer.o, attn_flat);
      add_into(xp, layer.o.outs[0].data_ptr<T>(), hidden);
      rms_norm(xp, layer.post_norm.data_ptr<T>(), hp, hidden, static_cast<float>(layer.post_eps));
      run(layer.gate_up, h);
      at::Tensor& gate = layer.gate_up.outs[0];
      silu_mul(gate.data_ptr<T>(), layer.gate_up.outs[1].data_ptr<T>(), gate.data_ptr<T>(), gate.numel(), work);
      run(layer.down, gate);
      add_into(xp, layer.down.outs[0].data_ptr<T>(), hidden);
    }
    rms_norm(xp, final_norm.data_ptr<T>(), hp, hidden, static_cast<float>(final_eps));
    run(head, h, /*fresh=*/true);
    return head.outs[0];
  }

  // Whether `mask` says what the step computes anyway: attend to the keys 0 .. p (p the cache's length). A
  // boolean [1, 1, 1, L] mask true exactly there (what generate() passes with a static cache), or a 2-D
  // [1, p + 1] mask of ones (keep or 1).
  bool mask_is_causal_prefix(const at::Tensor& mask) {
    if (!bound || layers.empty() || !mask.device().is_cpu() || !mask.is_contiguous()) return false;
    const int64_t pos = *layers[0].length.data_ptr<int64_t>();
    if (mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(0) == 1 && mask.size(1) == 1 && mask.size(2) == 1) {
      const bool* m = mask.data_ptr<bool>();
      const int64_t L = mask.size(3);
      if (pos >= L) return false;
      for (int64_t l = 0; l < L; ++l)
        if (m[l] != (l <= pos)) return false;
      return true;
    }
    if (mask.dim() == 2 && mask.size(0) == 1 && mask.size(1) == pos + 1) {
      bool ones = true;
      AT_DISPATCH_ALL_TYPES_AND(at::kBool, mask.scalar_type(), "mask_is_causal_prefix", [&] {
        const scalar_t* m = mask.data_ptr<scalar_t>();
        for (int64_t l = 0; l <= pos && ones; ++l) ones = m[l] == static_cast<scalar_t>(1);
      });
      return ones;
    }
    return false;
  }

  // Logits [1, 1, V] of the next token after `token` ([1, 1] int64), at the cache's length p; writes the
  // token's keys and values at p and advances every layer's length to p + 1.
  at::Tensor step(const at::Tensor& token) {
    TORCH_CHECK(bound && !layers.empty() && final_norm.defined(), "DecoderStep: not built or not bound to a cache");
    TORCH_CHECK(token.numel() == 1 && token.scalar_type() == at::kLong && token.device().is_cpu(), "DecoderStep: one int64 CPU token expected");
    const int64_t t = *token.data_ptr<int64_t>();
    TORCH_CHECK(t >= 0 && t < embedding.size(0), "DecoderStep: token ", t, " is out of the vocabulary (", embedding.size(0), ")");
    const int64_t pos = *layers[0].length.data_ptr<int64_t>();
    for (const Layer& layer : layers)
      TORCH_CHECK(*layer.length.data_ptr<int64_t>() == pos, "DecoderStep: the cache's layers hold different lengths");
    TORCH_CHECK(pos >= 0 && pos < layers[0].k_cache.size(1), "DecoderStep: the cache is full (", layers[0].k_cache.size(1), " positions)");
    TORCH_CHECK(rope_cos.defined() && pos < rope_cos.size(0), "DecoderStep: position ", pos, " is past the rotary table (",
                rope_cos.defined() ? rope_cos.size(0) : 0, ")");
    at::Tensor logits;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "decoder_step", [&] { logits = step_as<scalar_t>(t, pos); });
    for (Layer& layer : layers) *layer.length.data_ptr<int64_t>() += 1;
    return logits;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchao_mx_ext, m) {
  m.class_<DecoderStep>("DecoderStep")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double>())
      .def("set_embedding", &DecoderStep::set_embedding)
      .def("set_rope", &DecoderStep::set_rope)
      .def("add_dense", &DecoderStep::add_dense)
      .def("add_int8", &DecoderStep::add_int8)
      .def("add_mxfp4", &DecoderStep::add_mxfp4)
      .def("add_layer", &DecoderStep::add_layer)
      .def("set_head", &DecoderStep::set_head)
      .def("bind_cache", &DecoderStep::bind_cache)
      .def("mask_is_causal_prefix", &DecoderStep::mask_is_causal_prefix)
      .def("step", &DecoderStep::step);
}
