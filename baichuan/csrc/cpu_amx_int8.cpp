// int8 weights against the decode kernel's int16 activation codes on AMX-INT8 tiles (avx512bf16 build, CPUs with
// AMX-INT8), with a scale a row or bf16 scales per group of G inputs (G a multiple of 32: an 8-bit model's head has
// groups of 32). The same arithmetic as `int8_gemv` (cpu_gemv_int8.cpp): exact int32 sums per activation block of B
// inputs (G, or up to 256 for row scales), then out += float(sum) * block scale (* group scale) in fp32, and out *= the
// row's scale; so it is as accurate as the mat-vec (the codes' relative error ~1.5e-5; bf16 activations, as
// `amx_int8_matmul` takes them, ~2e-3), at a cost that hardly grows with the rows.
//
// An int16 code is 256 * hi + lo, hi its signed high byte and lo its unsigned low byte, so a weight row's sum over a
// block is 256 * (w . hi) + (w . lo): one `tdpbssd` (signed x signed) and one `tdpbsud` (signed x unsigned) per tile
// pair, both exact in int32 (a block of at most 256 inputs: 256 * 256 * 128 * 128 + 256 * 128 * 255 < 2^31). The
// int8 weight rows are the A tiles where they lie (16 rows of 64 codes, or 32 for groups of an odd multiple of 32; no
// widening, where `amx_int8_matmul` widens every code to bf16 and that, not the tiles, bounds it); the codes' bytes
// are the B tiles, packed once per call in the "VNNI" order AMX needs (4 consecutive inputs of a row side by side). A
// task takes blocks of 32 outputs (2 A tiles) against 16 activation rows at a time (the hi and lo B tiles): 4 C
// tiles, the 8 tiles all used. At the end of each activation block the C tiles go to memory and into the fp32 sums
// (a decode kernel: for hundreds of rows `amx_int8_matmul` is faster); meanwhile the next block of 32 weight rows is
// prefetched into L2.

#include "kernels.h"

#if defined(__x86_64__) && defined(__AVX512BF16__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define BAICHUAN_AMX_INT8 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

namespace baichuan_cpu_gemv {

// cpu_prompt_amx.cpp: the tile state granted to this process; the tiles' shapes.
#if defined(BAICHUAN_AMX_INT8)
__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles(const uint8_t (&rows)[8],
                                                                  const uint16_t (&colsb)[8]);
#endif

namespace {

#if defined(BAICHUAN_AMX_INT8)
#define BAICHUAN_AMX_INT8_FN __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")))

bool has_amx_int8() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25));
}

// C tiles 0-3 (16 rows of 16 int32 sums), A tiles 4-5 (16 weight rows of `step` codes), B tiles 6-7 (`step` / 4 quads
// of inputs of 16 activation rows).
BAICHUAN_AMX_INT8_FN void configure_for(int64_t step) {
  const auto quads = uint8_t(step / 4);
  const auto codes = uint16_t(step);
  configure_tiles({16, 16, 16, 16, 16, 16, quads, quads}, {64, 64, 64, 64, codes, codes, 64, 64});
}

// codes (M, K) int16 -> B tiles [M/16 groups][K/step steps][hi, lo][step/4 quads of inputs][16 rows][4 bytes], rows
// past M zero; and the block scales (M, blocks) -> [groups][blocks][16], zero past M.
BAICHUAN_AMX_INT8_FN void pack_codes(const int16_t* codes, const float* scales, int64_t M, int64_t K, int64_t step,
                                     int64_t blocks, int64_t groups, uint8_t* tiles, float* scales_by_group) {
  const int64_t steps = K / step, pair = step * 32;  // bytes of a step's hi and lo tiles
  std::memset(tiles, 0, groups * steps * pair);
  std::memset(scales_by_group, 0, groups * blocks * 16 * sizeof(float));
  // A row's codes of a step: their high and low bytes, 4 inputs (a dword) to each quad's tile row.
  const __m512i quads = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
  const __mmask16 lanes = step == 64 ? 0xFFFF : 0x00FF;
  const auto bytes = [](__m512i v0, __m512i v1) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(v0)), _mm512_cvtepi16_epi8(v1), 1);
  };
  // Small enough for the calling thread alone at decode sizes, where waking the pool costs more than packing.
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t g = m / 16, column = (m % 16) * 4;
      for (int64_t b = 0; b < blocks; ++b) scales_by_group[(g * blocks + b) * 16 + m % 16] = scales[m * blocks + b];
      for (int64_t s = 0; s < steps; ++s) {
        uint8_t* hi = tiles + (g * steps + s) * pair + column;
        const int16_t* c = codes + m * K + s * step;
        const __m512i v0 = _mm512_loadu_si512(c);
        const __m512i v1 = step == 64 ? _mm512_loadu_si512(c + 32) : _mm512_setzero_si512();
        _mm512_mask_i32scatter_epi32(hi, lanes, quads, bytes(_mm512_srai_epi16(v0, 8), _mm512_srai_epi16(v1, 8)), 4);
        _mm512_mask_i32scatter_epi32(hi + pair / 2, lanes, quads, bytes(v0, v1), 4);
      }
    }
  });
}

// Output blocks [b0, b1) of 32 weight rows against every activation row. The weight's scales: one a row
// (row_scales), or bf16 ones per block of B inputs (group_scales (N, K/B)).
BAICHUAN_AMX_INT8_FN void run_blocks(const int8_t* w, const float* row_scales, const at::BFloat16* group_scales,
                                     const uint8_t* tiles, const float* scales_by_group, float* Y, at::BFloat16* Yb,
                                     int64_t M, int64_t N, int64_t K, int64_t B, int64_t step, int64_t groups,
                                     int64_t b0, int64_t b1) {
  configure_for(step);
  const int64_t steps = K / step, blocks = K / B, block_steps = B / step, pair = step * 32;
  alignas(64) int32_t c[4][16][16];  // C tiles: rows 0-15 hi, rows 0-15 lo, rows 16-31 hi, rows 16-31 lo
  alignas(64) float sums[32][16];    // output row x activation row of the group
  // The next 32 weight rows' lines, spread over this block's steps of every group.
  const int64_t per_step = (32 * K / 64 + steps * groups - 1) / (steps * groups);
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* a0 = w + b * 32 * K;
    const int8_t* a1 = a0 + 16 * K;
    const char* next = b + 1 < b1 ? reinterpret_cast<const char*>(a0 + 32 * K) : nullptr;
    const char* next_end = next ? next + 32 * K : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* gt = tiles + g * steps * pair;
      const float* gs = scales_by_group + g * blocks * 16;
      for (auto& row : sums) _mm512_store_ps(row, _mm512_setzero_ps());
      for (int64_t blk = 0; blk < blocks; ++blk) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = blk * block_steps; s < (blk + 1) * block_steps; ++s) {
          _tile_loadd(4, a0 + s * step, K);
          _tile_loadd(5, a1 + s * step, K);
          _tile_loadd(6, gt + s * pair, 64);
          _tile_loadd(7, gt + s * pair + pair / 2, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
          for (int64_t i = 0; i < per_step && next < next_end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        const __m512 scale = _mm512_loadu_ps(gs + blk * 16);
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < 16; ++r) {
            const __m512i exact = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c[2 * h][r]), 8),
                                                   _mm512_load_si512(c[2 * h + 1][r]));
            const int64_t n = b * 32 + h * 16 + r;
            const __m512 s = group_scales ? _mm512_mul_ps(scale, _mm512_set1_ps(float(group_scales[n * blocks + blk])))
                                          : scale;
            float* row = sums[h * 16 + r];
            _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), s, _mm512_load_ps(row)));
          }
      }
      const int64_t rows = std::min<int64_t>(16, M - g * 16);
      for (int64_t n = 0; n < 32; ++n) {
        const float s = group_scales ? 1.0f : row_scales[b * 32 + n];
        for (int64_t j = 0; j < rows; ++j) {
          const int64_t at = (g * 16 + j) * N + b * 32 + n;
          if (Y)
            Y[at] = sums[n][j] * s;
          else
            Yb[at] = at::BFloat16(sums[n][j] * s);  // rounded to nearest even, as Tensor.to rounds
        }
      }
    }
  }
  _tile_release();
}
#endif

}  // namespace

bool amx_int8_ready() {
#if defined(BAICHUAN_AMX_INT8)
  static const bool ready = amx_ready() && has_amx_int8();
  return ready;
#else
  return false;
#endif
}

at::Tensor amx_int8_int16_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(amx_int8_ready(), "amx_int8_int16_matmul: this build or CPU has no AMX-INT8 (see amx_int8_ready)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "amx_int8_int16_matmul: x must be contiguous fp32 or bf16 (M, K) on the CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "amx_int8_int16_matmul: the weight must be contiguous int8 codes (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "amx_int8_int16_matmul: x has ", K, " inputs, the weight ", weight.size(1));
  TORCH_CHECK(N % 32 == 0 && K % 32 == 0 && K > 0, "amx_int8_int16_matmul: outputs and inputs must be multiples ",
              "of 32, got N=", N, ", K=", K);
  const int64_t B = int8_scales_block(scales, N, K);  // the activations' block: the weight's group, or up to 256
  TORCH_CHECK(B % 32 == 0, "amx_int8_int16_matmul: the group size must be a multiple of 32, got ", B);
  const int64_t step = B % 64 == 0 ? 64 : 32;  // inputs per tile step
  at::Tensor y = at::empty({M, N}, x.options());
#if defined(BAICHUAN_AMX_INT8)
  if (M > 0 && N > 0) {
    const auto [codes, block_scales] = int16_activations(x, B);
    const int64_t groups = (M + 15) / 16, blocks = K / B;
    std::vector<__m512i> tiles(groups * (K / step) * step * 32 / 64);
    std::vector<__m512> scales_by_group(groups * blocks);
    auto* T = reinterpret_cast<uint8_t*>(tiles.data());
    auto* S = reinterpret_cast<float*>(scales_by_group.data());
    pack_codes(codes.data_ptr<int16_t>(), block_scales.data_ptr<float>(), M, K, step, blocks, groups, T, S);
    const int8_t* w = weight.data_ptr<int8_t>();
    const bool grouped = scales.dim() == 2;
    const float* rs = grouped ? nullptr : scales.data_ptr<float>();
    const at::BFloat16* gs = grouped ? scales.data_ptr<at::BFloat16>() : nullptr;
    const bool bf16 = y.scalar_type() == at::kBFloat16;
    float* Y = bf16 ? nullptr : y.data_ptr<float>();
    at::BFloat16* Yb = bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
    at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) {
      run_blocks(w, rs, gs, T, S, Y, Yb, M, N, K, B, step, groups, b0, b1);
    });
  }
#endif
  return y;
}

}  // namespace baichuan_cpu_gemv
