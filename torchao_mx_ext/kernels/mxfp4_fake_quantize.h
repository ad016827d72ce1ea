// The activation side of an MXFP4 linear, shared by the quantizer operators (mxfp4_fake_quantize.cpp)
// and mxfp4_gemv's input transform (mxfp4_gemv.cpp), so that both compute the same bits.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace tme_cpu {

// out[r, :] = Q(x[r, :] R) for rows 0..rows-1 of a contiguous float32 x [rows, K], as
// torchao_mx_ext::mxfp4_rotate_fake_quantize computes it (rotation == nullptr: Q(x), as
// mxfp4_fake_quantize; scale_rule "none", with a rotation: x R alone). One thread; raises on a bad rule,
// rotation or width with the operators' messages.
void rotate_fake_quantize_rows(const float* x, float* out, int64_t rows, int64_t K, int64_t block_size, const at::Tensor* rotation,
                               c10::string_view scale_rule);

}  // namespace tme_cpu
