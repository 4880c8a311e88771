// What each source of the CPU kernel extension offers the others and Python (bindings.cpp binds the latter).
//
// Only ATen's tensor and thread-pool headers: <torch/extension.h> took ~44 s to compile in each of the eight
// sources (of 45-65 s each; GCC -O3 on a 2-core AMD EPYC), so only bindings.cpp includes pybind11 and torch's
// Python glue, and a first build takes a third of the time (benchmarks/README.md).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace baichuan_cpu_gemv {

// cpu_gemv.cpp, cpu_gemv_int8.cpp, cpu_gemv_int4.cpp, cpu_gemv_bf16.cpp (gemv.h): weight-only products for the
// few activation rows of decoding.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                     int64_t group_size);
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight);
bool set_single_stream(bool on);
const char* build_target();      // "avx2", "avx512" or "avx512bf16": what the flags of this build allow
const char* int4_activations();  // the integer type int4 products round activations to
// the decode kernel's activation block for these scales (checked), and its int16 codes and block scales
int64_t int8_scales_block(const at::Tensor& scales, int64_t N, int64_t K);
std::tuple<at::Tensor, at::Tensor> int16_activations(const at::Tensor& x, int64_t B);

// cpu_fused.cpp: the elementwise work around the products, and one decoder layer of a decode step.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                     double eps);
at::Tensor add(const at::Tensor& x, const at::Tensor& y);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        const std::vector<at::Tensor>& weights, const std::vector<int64_t>& kinds,
                        const std::vector<int64_t>& groups, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const std::vector<int64_t>& pos, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads);
float softmax_numerators(const float* s, int64_t n, float scale, at::BFloat16* p);

// cpu_prefill.cpp: prompts of quantized models.
void dequantize_int8(const at::Tensor& weight, const at::Tensor& scales, int64_t start, at::Tensor out);
void dequantize_int4(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size, int64_t start,
                     at::Tensor out);
void int4_matmul_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                      int64_t group_size, at::Tensor out);

// cpu_prompt_int8.cpp and cpu_prompt_bf16.cpp: prompt products without AMX.
void int8_matmul_int16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor out);
at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight);

// cpu_prompt_amx.cpp, cpu_attention_amx.cpp, cpu_amx_int8.cpp: AMX tiles, where the build and the CPU have them.
bool amx_ready();
at::Tensor amx_bf16_matmul(const at::Tensor& x, const at::Tensor& weight);
at::Tensor amx_int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);
at::Tensor amx_int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                           int64_t group_size);
at::Tensor amx_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
bool amx_int8_ready();
at::Tensor amx_int8_int16_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);

}  // namespace baichuan_cpu_gemv
