// Python bindings of the exl2core CUDA kernels (see exl2_kernels.h for the contracts).
#include <torch/extension.h>

#include "exl2_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "exl2core CUDA kernels (drop-in replacements for the PyTorch reference in exl2core.quant)";
    m.def("quantize_rows", &quantize_rows, "GPTQ quantize / fake-quantize / error step",
          py::arg("w"), py::arg("scale"), py::arg("diag"), py::arg("zero"), py::arg("maxq"),
          py::arg("codes"), py::arg("q"), py::arg("err"));
    m.def("grid_errors", &grid_errors, "scale-search error sums per multiplier",
          py::arg("x"), py::arg("multipliers"), py::arg("column_scale"), py::arg("zero"), py::arg("maxq"));
    m.def("pack_codes", &pack_codes, "pack codes into EXL2 q_weight");
    m.def("unpack_codes", &unpack_codes, "unpack EXL2 q_weight into codes");
    m.def("dequantize", &dequantize, "rebuild the fp16 weight of an EXL2 layer");
    m.def("exl2_matmul", &exl2_matmul, "x times an EXL2 weight, dequantized on the fly");
}
