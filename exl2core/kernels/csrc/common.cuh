// Shared device helpers: argument checks, launch sizing, bit-stream decoding and EXL2 scales.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>

#define EXL2_CHECK_CUDA(t, dtype)                                                                  \
    TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor");                                       \
    TORCH_CHECK((t).scalar_type() == (dtype), #t " has the wrong dtype");                          \
    TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t work, int threads = kThreads) {
    int64_t blocks = (work + threads - 1) / threads;
    return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// Code of stream position `index` of a `bits`-wide LSB-first bit stream that starts at word row
// `first_word` of column `col` (words of one column are `cols` apart). Codes may straddle two words.
__device__ __forceinline__ uint32_t read_code(const uint32_t* __restrict__ words, int64_t first_word,
                                              int64_t cols, int64_t col, int bits, int64_t index) {
    int64_t bit = index * bits;
    int64_t word = first_word + (bit >> 5);
    int offset = static_cast<int>(bit & 31);
    uint32_t value = words[word * cols + col] >> offset;
    if (offset + bits > 32) value |= words[(word + 1) * cols + col] << (32 - offset);
    return value & ((1u << bits) - 1u);
}

// Effective fp16 scale of one (group, column): fp16(fp16(qs^2) * m) with qs = nibble + 1 (spec 1.6).
// qs^2 and m are fp16 numbers whose float product is exact, so one rounding reproduces the fp16 multiply.
__device__ __forceinline__ float column_scale(const uint32_t* __restrict__ q_scale, int64_t scale_cols,
                                              int64_t group, int64_t col, const __half* scale_max) {
    uint32_t nibble = (q_scale[group * scale_cols + (col >> 3)] >> (4 * (col & 7))) & 15u;
    float qs = static_cast<float>(nibble + 1);
    return __half2float(__float2half_rn(__fmul_rn(qs * qs, __half2float(scale_max[group]))));
}

// fp16 weight value fp16((code - zero) * scale): the product is exact in float, then rounded once.
__device__ __forceinline__ float weight_value(uint32_t code, int bits, float scale) {
    float centered = static_cast<float>(static_cast<int>(code) - (1 << (bits - 1)));
    return __half2float(__float2half_rn(__fmul_rn(centered, scale)));
}
