// Quantizer kernels: the GPTQ per-row quantize/error step and the fused scale-search error sums.
// Every float operation uses an explicitly rounded intrinsic so nvcc cannot contract it into an FMA:
// the results must equal PyTorch's separately rounded ops bit for bit.
#include "common.cuh"
#include "exl2_kernels.h"

namespace {

__global__ void quantize_rows_kernel(const float* __restrict__ w, const float* __restrict__ scale,
                                     const float* __restrict__ diag, int64_t rows, int64_t cols, float zero,
                                     float maxq, int16_t* __restrict__ codes, float* __restrict__ q,
                                     float* __restrict__ err) {
    int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index >= rows * cols) return;
    int64_t row = index / cols;
    float s = scale[index - row * cols];
    float divisor = s > 0.0f ? s : 1.0f;  // an all-zero column rounds to code `zero`
    float x = w[index];
    float code = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(x, divisor)), zero), 0.0f), maxq);
    float fake = __half2float(__float2half_rn(__fmul_rn(__fsub_rn(code, zero), s)));
    codes[index] = static_cast<int16_t>(code);
    q[index] = fake;
    if (err != nullptr) {
        float e = __fsub_rn(x, fake);
        err[index] = diag != nullptr ? __fdiv_rn(e, diag[row]) : e;
    }
}

__device__ __forceinline__ float block_sum(float value) {
    __shared__ float warp_sums[kThreads / 32];
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = value;
    __syncthreads();
    value = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    return value;
}

// Grid (blocks over elements, multipliers): each block writes one partial sum per multiplier.
__global__ void grid_errors_kernel(const float* __restrict__ x, const float* __restrict__ multipliers,
                                   const float* __restrict__ column_scale, int64_t numel, int64_t cols,
                                   float low, float high, float* __restrict__ partial) {
    float m = multipliers[blockIdx.y];
    float acc = 0.0f;
    int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
        float trial = __fmul_rn(m, column_scale[i % cols]);
        float value = x[i];
        float level = fminf(fmaxf(rintf(__fdiv_rn(value, trial)), low), high);
        float e = fabsf(__fsub_rn(__fmul_rn(level, trial), value));
        acc += (e * e) * (sqrtf(e) * e);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

}  // namespace

void quantize_rows(const at::Tensor& w, const at::Tensor& scale, const c10::optional<at::Tensor>& diag,
                   int64_t zero, int64_t maxq, at::Tensor& codes, at::Tensor& q,
                   const c10::optional<at::Tensor>& err) {
    EXL2_CHECK_CUDA(w, at::kFloat);
    EXL2_CHECK_CUDA(scale, at::kFloat);
    EXL2_CHECK_CUDA(codes, at::kShort);
    EXL2_CHECK_CUDA(q, at::kFloat);
    int64_t cols = scale.numel();
    TORCH_CHECK(cols > 0 && w.numel() % cols == 0, "w must be rows of scale.numel() columns");
    int64_t rows = w.numel() / cols;
    TORCH_CHECK(codes.numel() == w.numel() && q.numel() == w.numel(), "outputs must match w");
    const float* diag_ptr = nullptr;
    if (diag.has_value() && diag->defined()) {
        EXL2_CHECK_CUDA(*diag, at::kFloat);
        TORCH_CHECK(diag->numel() == rows, "diag needs one value per row");
        diag_ptr = diag->data_ptr<float>();
    }
    float* err_ptr = nullptr;
    if (err.has_value() && err->defined()) {
        EXL2_CHECK_CUDA(*err, at::kFloat);
        TORCH_CHECK(err->numel() == w.numel(), "err must match w");
        err_ptr = err->data_ptr<float>();
    }
    if (w.numel() == 0) return;
    const at::cuda::CUDAGuard guard(w.device());
    quantize_rows_kernel<<<blocks_for(w.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<float>(), scale.data_ptr<float>(), diag_ptr, rows, cols, static_cast<float>(zero),
        static_cast<float>(maxq), codes.data_ptr<int16_t>(), q.data_ptr<float>(), err_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor grid_errors(const at::Tensor& x, const at::Tensor& multipliers, const at::Tensor& column_scale,
                       int64_t zero, int64_t maxq) {
    EXL2_CHECK_CUDA(x, at::kFloat);
    EXL2_CHECK_CUDA(multipliers, at::kFloat);
    EXL2_CHECK_CUDA(column_scale, at::kFloat);
    int64_t cols = column_scale.numel();
    TORCH_CHECK(cols > 0 && x.numel() % cols == 0, "x must be rows of column_scale.numel() columns");
    int64_t candidates = multipliers.numel();
    TORCH_CHECK(candidates > 0 && candidates < 65536, "between 1 and 65535 multipliers");
    const at::cuda::CUDAGuard guard(x.device());
    unsigned int blocks = blocks_for(x.numel(), kThreads * 8);
    blocks = blocks > 64 ? 64 : blocks;
    at::Tensor partial = at::empty({candidates, static_cast<int64_t>(blocks)}, x.options());
    dim3 grid(blocks, static_cast<unsigned int>(candidates));
    grid_errors_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<float>(), multipliers.data_ptr<float>(), column_scale.data_ptr<float>(), x.numel(), cols,
        static_cast<float>(-zero), static_cast<float>(maxq - zero), partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partial.sum(1);
}
