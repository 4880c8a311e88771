// The Python module of the CPU kernel extension: the one source that includes pybind11 and torch's Python glue
// (kernels.h says why). Each function is defined in the source named above it.

#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace k = baichuan_cpu_gemv;
  m.attr("target") = k::build_target();
  m.attr("int8_activations") = "int16";
  m.attr("int4_activations") = k::int4_activations();
  // cpu_gemv*.cpp
  m.def("int8_gemv", &k::int8_gemv,
        "(x @ weight.T) * scales, int8 weight (N, K), fp32 scales (N,) or bf16 group scales (N, K/G), "
        "fp32/bf16 x (M, K), y in x's dtype");
  m.def("int4_gemv", &k::int4_gemv, "x @ w.T for group-wise int4 w, packed (N, K/2), fp32/bf16 x (M, K)");
  m.def("bf16_gemv", &k::bf16_gemv, "x @ weight.T, bf16 weight (N, K), fp32/bf16 x (M, K), y in x's dtype");
  m.def("set_single_stream", &k::set_single_stream,
        "bf16_gemv and int8_gemv with a scale a row of one activation row read one weight row at a time, "
        "unprefetched; returns the setting before");
  // cpu_fused.cpp
  m.def("rms_norm", &k::rms_norm, "RMSNorm of fp32/bf16 rows (..., n) with a weight in their dtype");
  m.def("add_rms_norm", &k::add_rms_norm,
        "(x + residual, RMSNorm of it) for fp32/bf16 rows and a weight in their dtype, the sum rounded first");
  m.def("add", &k::add, "x + y, fp32/bf16 of one shape, rounded as torch rounds it");
  m.def("silu_mul", &k::silu_mul, "silu(gate) * up, fp32/bf16");
  m.def("rope", &k::rope, "RoPE over (B, H, T, D) queries or keys at the given positions, fp32/bf16");
  m.def("decode_layer", &k::decode_layer, "one decoder layer for the one-token rows of a decode step");
  // cpu_prefill.cpp
  m.def("dequantize_int8", &k::dequantize_int8,
        "rows [start, start + out.size(0)) of int8 weight (N, K) times fp32 scales (N,) into out (fp32 or bf16)");
  m.def("dequantize_int4", &k::dequantize_int4,
        "rows [start, start + out.size(0)) of int4 packed (N, K/2), bf16 scales_and_zeros (K/G, N, 2) into out");
  m.def("int4_matmul_int8", &k::int4_matmul_int8,
        "out (M, N) fp32 = x (M, K) fp32/bf16, quantized to int8 per group, @ int4 packed (N, K/2) .T");
  // cpu_prompt_int8.cpp
  m.def("int8_matmul_int16", &k::int8_matmul_int16,
        "out (M, N) fp32 = x (M, K) fp32/bf16, quantized to int16 per block as the decode kernel does, @ (int8 "
        "weight (N, K) scaled by fp32 (N,) or bf16 (N, K/G) scales).T");
  // cpu_prompt_bf16.cpp
  m.def("bf16_matmul", &k::bf16_matmul,
        "out (M, N) = x (M, K) fp32/bf16 @ bf16 weight (N, K).T, by fp32 FMAs on the widened weight; out in x's "
        "dtype");
  // cpu_prompt_amx.cpp
  m.def("amx_ready", &k::amx_ready,
        "whether the amx_*_matmul kernels run here: built with them, AMX-BF16, tiles permitted");
  m.def("amx_bf16_matmul", &k::amx_bf16_matmul,
        "out (M, N) = x (M, K) @ weight (N, K).T on AMX tiles, bf16 in and out, N and K multiples of 32");
  m.def("amx_int8_matmul", &k::amx_int8_matmul,
        "out (M, N) = x (M, K) @ (weight (N, K) int8 * scales (N,) fp32).T on AMX tiles, bf16 x and out");
  m.def("amx_int4_matmul", &k::amx_int4_matmul,
        "out (M, N) = x (M, K) @ w.T, w the int4 packed (N, K/2) with bf16 scales_and_zeros (K/G, N, 2) dequantized "
        "to bf16, on AMX tiles, bf16 x and out");
  // cpu_attention_amx.cpp
  m.def("amx_causal_attention", &k::amx_causal_attention,
        "causal attention of bf16 q, k, v (B, H, T, D) on AMX tiles (D a multiple of 32), out (B, T, H * D)");
  // cpu_amx_int8.cpp
  m.def("amx_int8_ready", &k::amx_int8_ready,
        "whether amx_int8_int16_matmul runs here: built with it, AMX-INT8 and AMX-BF16, tiles permitted");
  m.def("amx_int8_int16_matmul", &k::amx_int8_int16_matmul,
        "(x @ weight.T) * scales on AMX-INT8 tiles, x's int16 codes as int8_gemv quantizes them, int8 weight (N, K), "
        "fp32 scales (N,) or bf16 group scales (N, K/G), G a multiple of 32, N and K multiples of 32; fp32/bf16 x "
        "(M, K), y in x's dtype");
}
