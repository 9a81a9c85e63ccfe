// Host entry points of the exl2core CUDA kernels. Numerics are defined by the PyTorch reference in
// exl2core/quant (gptq.py, pack.py); each function here reproduces it on CUDA tensors.
#pragma once

#include <torch/extension.h>

// Quantize / fake-quantize / error step of GPTQ (spec 3.5) for rows w [R, N] with per-column scale [N].
// Writes codes (int16), q (fp16-exact float) and, when err is defined, (w - q) / diag[r] (diag may be
// undefined: no division).
void quantize_rows(const at::Tensor& w, const at::Tensor& scale, const c10::optional<at::Tensor>& diag,
                   int64_t zero, int64_t maxq, at::Tensor& codes, at::Tensor& q,
                   const c10::optional<at::Tensor>& err);

// Scale-search error sums: for each multiplier m, sum over x of |q - x|^3.5 with the trial scale
// m * column_scale[n] (spec 3.4). Deterministic two-stage reduction.
at::Tensor grid_errors(const at::Tensor& x, const at::Tensor& multipliers, const at::Tensor& column_scale,
                       int64_t zero, int64_t maxq);

// EXL2 q_weight packing (spec 1.3); the group tables come from exl2core/kernels/layout.py.
at::Tensor pack_codes(const at::Tensor& codes, const at::Tensor& bits, const at::Tensor& row_start,
                      const at::Tensor& qrow_start, const at::Tensor& word_group);

at::Tensor unpack_codes(const at::Tensor& q_weight, const at::Tensor& bits, const at::Tensor& row_start,
                        const at::Tensor& qrow_start, const at::Tensor& row_group);

// fp16 weight [N, K] (nn.Linear layout) from packed tensors; scale_max already holds the fp16
// q_scale_max * prescale / 256 (spec 1.9).
at::Tensor dequantize(const at::Tensor& q_weight, const at::Tensor& q_scale, const at::Tensor& scale_max,
                      const at::Tensor& invperm, const at::Tensor& bits, const at::Tensor& row_start,
                      const at::Tensor& qrow_start, const at::Tensor& row_group);

// y [M, N] fp16 = x [M, K] fp16 times the EXL2 weight, reconstructed in registers chunk by chunk.
at::Tensor exl2_matmul(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& q_weight,
                       const at::Tensor& q_scale, const at::Tensor& scale_max, const at::Tensor& bits,
                       const at::Tensor& qrow_start, const at::Tensor& row_start,
                       const at::Tensor& chunk_group);
