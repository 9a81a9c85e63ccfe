// y = x * W for an EXL2 weight, reconstructing W in registers 32 permuted rows at a time.
//
// Every group size is a multiple of 32 rows and every group starts on a word boundary, so a 32-row chunk
// lies in one group and its codes for one column are exactly `bits` consecutive words of that column.
// A block owns 128 columns (one per thread), 8 rows of x and a slice of K (split-K: partial sums are
// added atomically into a float32 output). The x values of a chunk are gathered through the act-order
// permutation into shared memory; weights are the exact fp16 values of the dequantizer (spec 1.9),
// products are accumulated in float32.
#include "common.cuh"
#include "exl2_kernels.h"

namespace {

constexpr int kColsPerBlock = 128;
constexpr int kRowsPerBlock = 8;
constexpr int kChunksPerBlock = 8;
constexpr int kChunk = 32;

template <int B>
__device__ __forceinline__ void decode_chunk(const uint32_t* __restrict__ q_weight, int64_t first_word,
                                             int64_t cols, int64_t col, float scale, float* w) {
    uint32_t words[B];
#pragma unroll
    for (int j = 0; j < B; ++j) words[j] = q_weight[(first_word + j) * cols + col];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
        const int bit = i * B, word = bit >> 5, offset = bit & 31;
        uint32_t value = words[word] >> offset;
        if (offset + B > 32) value |= words[word + 1] << (32 - offset);
        w[i] = weight_value(value & ((1u << B) - 1u), B, scale);
    }
}

__global__ void exl2_matmul_kernel(const __half* __restrict__ x, const int* __restrict__ perm,
                                   const uint32_t* __restrict__ q_weight,
                                   const uint32_t* __restrict__ q_scale,
                                   const __half* __restrict__ scale_max, const int* __restrict__ bits,
                                   const int* __restrict__ qrow_start, const int* __restrict__ row_start,
                                   const int* __restrict__ chunk_group, int64_t rows, int64_t depth,
                                   int64_t cols, float* __restrict__ out) {
    __shared__ float xs[kRowsPerBlock][kChunk];
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + threadIdx.x;
    const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
    const int64_t chunks = depth / kChunk;
    const int64_t chunk_begin = static_cast<int64_t>(blockIdx.z) * kChunksPerBlock;
    const int64_t chunk_end = chunk_begin + kChunksPerBlock < chunks ? chunk_begin + kChunksPerBlock : chunks;
    float acc[kRowsPerBlock];
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) acc[r] = 0.0f;
    float w[kChunk];

    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        __syncthreads();
        for (int e = threadIdx.x; e < kRowsPerBlock * kChunk; e += blockDim.x) {
            const int r = e / kChunk, i = e % kChunk;
            const int64_t row = first_row + r;
            xs[r][i] = row < rows ? __half2float(x[row * depth + perm[chunk * kChunk + i]]) : 0.0f;
        }
        __syncthreads();
        if (col >= cols) continue;
        const int group = chunk_group[chunk];
        const int b = bits[group];
        const int64_t first_word = qrow_start[group] + (chunk * kChunk - row_start[group]) / kChunk * b;
        const float scale = column_scale(q_scale, cols / 8, group, col, scale_max);
        switch (b) {
            case 2: decode_chunk<2>(q_weight, first_word, cols, col, scale, w); break;
            case 3: decode_chunk<3>(q_weight, first_word, cols, col, scale, w); break;
            case 4: decode_chunk<4>(q_weight, first_word, cols, col, scale, w); break;
            case 5: decode_chunk<5>(q_weight, first_word, cols, col, scale, w); break;
            case 6: decode_chunk<6>(q_weight, first_word, cols, col, scale, w); break;
            case 8: decode_chunk<8>(q_weight, first_word, cols, col, scale, w); break;
            default:
#pragma unroll
                for (int i = 0; i < kChunk; ++i) w[i] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < kRowsPerBlock; ++r) {
#pragma unroll
            for (int i = 0; i < kChunk; ++i) acc[r] = fmaf(w[i], xs[r][i], acc[r]);
        }
    }
    if (col >= cols) return;
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
        if (first_row + r < rows) atomicAdd(&out[(first_row + r) * cols + col], acc[r]);
    }
}

}  // namespace

at::Tensor exl2_matmul(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& q_weight,
                       const at::Tensor& q_scale, const at::Tensor& scale_max, const at::Tensor& bits,
                       const at::Tensor& qrow_start, const at::Tensor& row_start,
                       const at::Tensor& chunk_group) {
    EXL2_CHECK_CUDA(x, at::kHalf);
    EXL2_CHECK_CUDA(perm, at::kInt);
    EXL2_CHECK_CUDA(q_weight, at::kInt);
    EXL2_CHECK_CUDA(q_scale, at::kInt);
    EXL2_CHECK_CUDA(scale_max, at::kHalf);
    EXL2_CHECK_CUDA(bits, at::kInt);
    EXL2_CHECK_CUDA(qrow_start, at::kInt);
    EXL2_CHECK_CUDA(row_start, at::kInt);
    EXL2_CHECK_CUDA(chunk_group, at::kInt);
    TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
    const int64_t rows = x.size(0), depth = x.size(1), cols = q_weight.size(1);
    TORCH_CHECK(depth % kChunk == 0 && chunk_group.numel() * kChunk == depth, "K must be 32 * chunks");
    TORCH_CHECK(perm.numel() == depth, "perm must have K entries");
    TORCH_CHECK(q_scale.size(1) * 8 == cols, "q_scale must hold one nibble per column");
    at::Tensor out = at::zeros({rows, cols}, x.options().dtype(at::kFloat));
    if (out.numel() == 0) return out.to(at::kHalf);
    const at::cuda::CUDAGuard guard(x.device());
    const int64_t chunks = depth / kChunk;
    dim3 grid(static_cast<unsigned int>((cols + kColsPerBlock - 1) / kColsPerBlock),
              static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
              static_cast<unsigned int>((chunks + kChunksPerBlock - 1) / kChunksPerBlock));
    TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "matrix too large for one launch");
    exl2_matmul_kernel<<<grid, kColsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), perm.data_ptr<int>(),
        reinterpret_cast<const uint32_t*>(q_weight.data_ptr<int32_t>()),
        reinterpret_cast<const uint32_t*>(q_scale.data_ptr<int32_t>()),
        reinterpret_cast<const __half*>(scale_max.data_ptr<at::Half>()), bits.data_ptr<int>(),
        qrow_start.data_ptr<int>(), row_start.data_ptr<int>(), chunk_group.data_ptr<int>(), rows, depth, cols,
        out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out.to(at::kHalf);
}
