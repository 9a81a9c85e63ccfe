// EXL2 on-disk layout kernels (spec 1.3-1.9): pack codes, unpack codes, dequantize to fp16.
// One thread per output element; group membership comes from the index tables of layout.py.
#include "common.cuh"
#include "exl2_kernels.h"

namespace {

// One thread per packed word (row `word`, column `col`): OR together the codes overlapping its 32 bits.
__global__ void pack_codes_kernel(const int16_t* __restrict__ codes, const int* __restrict__ bits,
                                  const int* __restrict__ row_start, const int* __restrict__ qrow_start,
                                  const int* __restrict__ word_group, int64_t packed_rows, int64_t cols,
                                  int32_t* __restrict__ q_weight) {
    int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index >= packed_rows * cols) return;
    int64_t word = index / cols;
    int64_t col = index - word * cols;
    int group = word_group[word];
    int b = bits[group];
    int64_t first_bit = (word - qrow_start[group]) * 32;
    int64_t first_code = first_bit / b, last_code = (first_bit + 31) / b;
    uint32_t packed = 0;
    for (int64_t i = first_code; i <= last_code; ++i) {
        int16_t value = codes[(row_start[group] + i) * cols + col];
        uint32_t code = static_cast<uint32_t>(static_cast<uint16_t>(value));
        int64_t shift = i * b - first_bit;
        packed |= shift >= 0 ? code << shift : code >> (-shift);
    }
    q_weight[index] = static_cast<int32_t>(packed);
}

__global__ void unpack_codes_kernel(const uint32_t* __restrict__ q_weight, const int* __restrict__ bits,
                                    const int* __restrict__ row_start, const int* __restrict__ qrow_start,
                                    const int* __restrict__ row_group, int64_t rows, int64_t cols,
                                    int16_t* __restrict__ codes) {
    int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index >= rows * cols) return;
    int64_t row = index / cols;
    int64_t col = index - row * cols;
    int group = row_group[row];
    codes[index] = static_cast<int16_t>(
        read_code(q_weight, qrow_start[group], cols, col, bits[group], row - row_start[group]));
}

// One thread per output element (column n, input feature j), j fastest so writes are coalesced;
// the permuted row holding feature j is invperm[j].
__global__ void dequantize_kernel(const uint32_t* __restrict__ q_weight,
                                  const uint32_t* __restrict__ q_scale,
                                  const __half* __restrict__ scale_max, const int* __restrict__ invperm,
                                  const int* __restrict__ bits, const int* __restrict__ row_start,
                                  const int* __restrict__ qrow_start, const int* __restrict__ row_group,
                                  int64_t rows, int64_t cols, __half* __restrict__ out) {
    int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index >= rows * cols) return;
    int64_t col = index / rows;
    int64_t row = invperm[index - col * rows];
    int group = row_group[row];
    int b = bits[group];
    uint32_t code = read_code(q_weight, qrow_start[group], cols, col, b, row - row_start[group]);
    float scale = column_scale(q_scale, cols / 8, group, col, scale_max);
    out[index] = __float2half_rn(weight_value(code, b, scale));
}

void check_tables(const at::Tensor& bits, const at::Tensor& row_start, const at::Tensor& qrow_start) {
    EXL2_CHECK_CUDA(bits, at::kInt);
    EXL2_CHECK_CUDA(row_start, at::kInt);
    EXL2_CHECK_CUDA(qrow_start, at::kInt);
    TORCH_CHECK(bits.numel() == row_start.numel() && bits.numel() == qrow_start.numel(),
                "group tables disagree on the number of groups");
}

}  // namespace

at::Tensor pack_codes(const at::Tensor& codes, const at::Tensor& bits, const at::Tensor& row_start,
                      const at::Tensor& qrow_start, const at::Tensor& word_group) {
    EXL2_CHECK_CUDA(codes, at::kShort);
    TORCH_CHECK(codes.dim() == 2, "codes must be [K, N]");
    check_tables(bits, row_start, qrow_start);
    EXL2_CHECK_CUDA(word_group, at::kInt);
    int64_t packed_rows = word_group.numel(), cols = codes.size(1);
    at::Tensor q_weight = at::empty({packed_rows, cols}, codes.options().dtype(at::kInt));
    if (q_weight.numel() == 0) return q_weight;
    const at::cuda::CUDAGuard guard(codes.device());
    pack_codes_kernel<<<blocks_for(q_weight.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        codes.data_ptr<int16_t>(), bits.data_ptr<int>(), row_start.data_ptr<int>(),
        qrow_start.data_ptr<int>(), word_group.data_ptr<int>(), packed_rows, cols,
        q_weight.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return q_weight;
}

at::Tensor unpack_codes(const at::Tensor& q_weight, const at::Tensor& bits, const at::Tensor& row_start,
                        const at::Tensor& qrow_start, const at::Tensor& row_group) {
    EXL2_CHECK_CUDA(q_weight, at::kInt);
    TORCH_CHECK(q_weight.dim() == 2, "q_weight must be [Q, N]");
    check_tables(bits, row_start, qrow_start);
    EXL2_CHECK_CUDA(row_group, at::kInt);
    int64_t rows = row_group.numel(), cols = q_weight.size(1);
    at::Tensor codes = at::empty({rows, cols}, q_weight.options().dtype(at::kShort));
    if (codes.numel() == 0) return codes;
    const at::cuda::CUDAGuard guard(q_weight.device());
    unpack_codes_kernel<<<blocks_for(codes.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint32_t*>(q_weight.data_ptr<int32_t>()), bits.data_ptr<int>(),
        row_start.data_ptr<int>(), qrow_start.data_ptr<int>(), row_group.data_ptr<int>(), rows, cols,
        codes.data_ptr<int16_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return codes;
}

at::Tensor dequantize(const at::Tensor& q_weight, const at::Tensor& q_scale, const at::Tensor& scale_max,
                      const at::Tensor& invperm, const at::Tensor& bits, const at::Tensor& row_start,
                      const at::Tensor& qrow_start, const at::Tensor& row_group) {
    EXL2_CHECK_CUDA(q_weight, at::kInt);
    EXL2_CHECK_CUDA(q_scale, at::kInt);
    EXL2_CHECK_CUDA(scale_max, at::kHalf);
    EXL2_CHECK_CUDA(invperm, at::kInt);
    EXL2_CHECK_CUDA(row_group, at::kInt);
    check_tables(bits, row_start, qrow_start);
    int64_t rows = row_group.numel(), cols = q_weight.size(1);
    TORCH_CHECK(q_scale.size(1) * 8 == cols, "q_scale must hold one nibble per column");
    TORCH_CHECK(invperm.numel() == rows, "q_invperm must have one entry per row");
    at::Tensor out = at::empty({cols, rows}, q_weight.options().dtype(at::kHalf));
    if (out.numel() == 0) return out;
    const at::cuda::CUDAGuard guard(q_weight.device());
    dequantize_kernel<<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint32_t*>(q_weight.data_ptr<int32_t>()),
        reinterpret_cast<const uint32_t*>(q_scale.data_ptr<int32_t>()),
        reinterpret_cast<const __half*>(scale_max.data_ptr<at::Half>()), invperm.data_ptr<int>(),
        bits.data_ptr<int>(), row_start.data_ptr<int>(), qrow_start.data_ptr<int>(),
        row_group.data_ptr<int>(), rows, cols, reinterpret_cast<__half*>(out.data_ptr<at::Half>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}
