// The kernels' entry points for other kernels of this library (decoder_step.cpp): the functions the
// operators run, called directly, without a dispatcher round trip per call. Same checks, same bits.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace tme_ops {

// torchao_mx_ext::mxfp4_gemv (mxfp4_gemv.cpp).
at::Tensor mxfp4_gemv(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale, int64_t block_size, double multiplier,
                      const c10::optional<at::Tensor>& bias, c10::optional<at::ScalarType> out_dtype,
                      const c10::optional<at::Tensor>& rotation, c10::optional<c10::string_view> act_scale_rule);

// torchao_mx_ext::mxfp4_gemv_group into preallocated contiguous outputs (their dtype is the out dtype).
void mxfp4_gemv_group_into(const at::Tensor& x, at::TensorList qdata, at::TensorList scale, int64_t block_size, double multiplier,
                           const c10::List<c10::optional<at::Tensor>>& bias, const c10::List<c10::optional<at::Tensor>>& rotation,
                           c10::optional<c10::string_view> act_scale_rule, at::TensorList outs);

std::vector<at::Tensor> mxfp4_gemv_group(const at::Tensor& x, at::TensorList qdata, at::TensorList scale, int64_t block_size,
                                         double multiplier, const c10::List<c10::optional<at::Tensor>>& bias,
                                         c10::optional<at::ScalarType> out_dtype, const c10::List<c10::optional<at::Tensor>>& rotation,
                                         c10::optional<c10::string_view> act_scale_rule);

// torchao_mx_ext::int8_gemv (int8_gemv.cpp).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                     c10::optional<at::ScalarType> out_dtype);

// torchao_mx_ext::decode_attention's math (decode_attention.cpp) for q [H, Lq, D] against the first
// `length` keys of a cache k [H, L, D], v [H, L, Dv] (no mask: a decode step's causal prefix), into out
// [H, Lq, Dv]; all contiguous, one dtype.
void decode_attention_prefix_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t length, double scale,
                                  at::Tensor& out);

}  // namespace tme_ops
