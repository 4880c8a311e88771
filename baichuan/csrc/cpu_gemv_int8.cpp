// int8 weights against the few activation rows of decoding (gemv.h: the builds and what the formats share;
// cpu_gemv.cpp: the activations' int16 codes):
//   y[m, n] = scales[n] * sum_k w[n, k] x[m, k]; w int8 (N, K) row-major. Or with a scale per group of G columns (an
//   output head, as llama.cpp's Q8_0): y[m, n] = sum_g scales[n, g] sum_{k in g} w[n, k] x[m, k], scales bf16
//   (N, K/G), and the activations' block is G.

#include "int8_tile.h"

namespace baichuan_cpu_gemv {

// Per-block values of the activation rows (M, blocks) as (blocks, M + 8), zero past row M, where the int8 tiles
// load those of several rows at once; an undefined tensor (no operation dispatched) where no tile reads them.
at::Tensor by_block(const at::Tensor& values) {
  const int64_t M = values.size(0), blocks = values.size(1);
  if (M == 1) return {};
  at::Tensor out = at::zeros({blocks, M + 8}, values.options());
  const float* S = values.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) O[b * (M + 8) + m] = S[m * blocks + b];
  return out;
}

// int16 codes (M, K) in passes of 8 rows (zero past M), each as (K / W, 8, W): `Int8Tile::x_lanes`.
at::Tensor rows_in_lanes(const at::Tensor& codes, int64_t W) {
  const int64_t M = codes.size(0), runs = codes.size(1) / W;
  at::Tensor out = at::zeros({(M + 7) / 8, runs, 8, W}, codes.options());
  const int16_t* in = codes.data_ptr<int16_t>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < runs; ++i)
      std::memcpy(o + (((m / 8) * runs + i) * 8 + m % 8) * W, in + (m * runs + i) * W, W * sizeof(int16_t));
  return out;
}

#if !defined(BAICHUAN_AVX512)
// int16 codes of 3 or 4 rows (M, K) as (K / 16, 4, 2, 4, 2), zero past M: for each 16 columns and pair q, the 4 rows'
// columns 2q and 2q + 1, then their columns 8 + 2q and 9 + 2q (`Int8Tile::run_lanes`).
at::Tensor rows_in_halves(const at::Tensor& codes) {
  const int64_t M = codes.size(0), K = codes.size(1);
  at::Tensor out = at::zeros({K / 16, 4, 2, 4, 2}, codes.options());
  const int16_t* in = codes.data_ptr<int16_t>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K / 16; ++c)
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t h = 0; h < 2; ++h)
          std::memcpy(o + (((c * 4 + q) * 2 + h) * 4 + m) * 2, in + m * K + c * 16 + h * 8 + 2 * q,
                      2 * sizeof(int16_t));
  return out;
}
#endif

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  check_activations(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: contiguous int8 (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight has ", weight.size(1), " columns, x has ", K);
  const bool grouped = scales.dim() == 2;
  const int64_t B = int8_scales_block(scales, N, K);
#if defined(BAICHUAN_AVX512)
  const bool split = false;
#else
  // 3-4 rows against small groups: `run_lanes`, over codes in order
  const bool halves = grouped && B <= kMaxLaneBlock && (M == 3 || M == 4);
  // not from 5 rows, where the split steps took 1.19-1.24 of the time (ab_kernels, 8 rows; benchmarks/README.md)
  const bool split = B % 32 == 0 && M <= 4 && !halves;
#endif
  const Activations a = quantize_activations(x, B, split);
  auto y = at::empty({M, N}, x.options());
  const at::Tensor xs_by_block = by_block(a.scales);
  const int8_t* w = weight.data_ptr<int8_t>();
  const int16_t* xq = a.codes.data_ptr<int16_t>();
  const float *xs = a.scales.data_ptr<float>(), *xs_by_block_data = data_or_null(xs_by_block);
  if (grouped) {
    const auto* group_scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
#if defined(BAICHUAN_AVX512)
    const at::Tensor x_lanes = B <= kMaxLaneBlock && M >= 5 ? rows_in_lanes(a.codes, 4) : at::Tensor();
#else
    const at::Tensor x_lanes = halves                         ? rows_in_halves(a.codes)
                               : B <= kMaxLaneBlock && M >= 5 ? rows_in_lanes(a.codes, 2)
                                                              : at::Tensor();
#endif
    const int16_t* lanes = x_lanes.defined() ? x_lanes.data_ptr<int16_t>() : nullptr;
    run_all(Int8Tile<true>{{w, nullptr, group_scales, xq, xs, xs_by_block_data, lanes, output_of(y), N, K, B, a.blocks,
                            M, split}},
            N, M, K);
  } else {
#if defined(BAICHUAN_AVX512)
    const at::Tensor x_lanes;
#else
    const at::Tensor x_lanes = M >= 8 ? rows_in_lanes(a.codes, 16) : at::Tensor();  // `Int8Tile::run_steps`
#endif
    const Int8Tile<false> tile{{w, scales.data_ptr<float>(), nullptr, xq, xs, xs_by_block_data,
                                x_lanes.defined() ? x_lanes.data_ptr<int16_t>() : nullptr, output_of(y), N, K, B,
                                a.blocks, M, split}};
#if defined(BAICHUAN_AVX512)
    if (M == 1 && single_stream) {
      run_all(Int8StreamTile{tile}, N, M, K);
      return y;
    }
#endif
    run_all(tile, N, M, K);
  }
  return y;
}

}  // namespace baichuan_cpu_gemv
