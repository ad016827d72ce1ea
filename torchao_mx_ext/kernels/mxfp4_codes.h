// E2M1 codes as the integer kernels read them (mxfp4_mm.cpp, the integer path of mxfp4_gemv.cpp).
#pragma once

#include <cstdint>

namespace tme_cpu {

// E2M1 code -> 2 * value (sign << 3 | index; magnitudes 2 * {0, .5, 1, 1.5, 2, 3, 4, 6}, OCP MX v1.0).
inline constexpr int8_t kE2M1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// The same plus kE2M1x2Bias, in [0, 24]: the unsigned byte operand of vpdpbusd / vpmaddubsw; the
// caller subtracts the bias's share, kE2M1x2Bias * (sum of the other operand), exactly in int32.
inline constexpr int8_t kE2M1x2Bias = 12;
inline constexpr int8_t kE2M1x2Biased[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

}  // namespace tme_cpu
