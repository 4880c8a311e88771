// The int8 decode tile of `int8_gemv` (cpu_gemv_int8.cpp): the operands every build's tile reads, then the tile of
// the build's target, int8_tile_avx2.h or int8_tile_avx512.h (gemv.h: the targets).

#pragma once

#include "gemv.h"

namespace baichuan_cpu_gemv {

// The largest group of int8 scales for which 3 (AVX2) or 5 (AVX-512) to 8 activation rows go in the lanes of one
// accumulator (Int8Tile::run_lanes and run_pairs, run_quads): past it, the other tiles' reduction at each block's
// end costs less.
constexpr int64_t kMaxLaneBlock = 64;

// What an int8 tile multiplies: the weight, its scales, the activation rows' codes and scales, where they go.
struct Int8Operands {
  const int8_t* w;
  const float* scales;           // per row (N,), where !kGroupScales
  const uint16_t* group_scales;  // bf16 (N, blocks), one per activation block, where kGroupScales
  const int16_t* xq;
  const float* xs;
  const float* xs_by_block;  // (blocks, M + 8): xs transposed, for the tiles of several activation rows
  // Group scales of at most kMaxLaneBlock columns and 5+ activation rows: the codes of each pass of 8 rows (zero
  // past M) as (K / W, 8, W), W columns of each row in turn (`rows_in_lanes`): quads (AVX-512) or pairs (AVX2),
  // so that a vector holds the 8 rows' columns that one weight vector multiplies; AVX2, a call of 3-4 rows: the
  // codes as `rows_in_halves` lays them out; AVX2, a scale a row and 8+ activation rows: each pass's codes as
  // (K / 16, 8, 16); else null.
  const int16_t* x_lanes;
  Output y;
  int64_t N, K, B, blocks, M;
  // avx2: the activation codes in `quantize_activations`' split order (B a multiple of 32), so that each 32 weights
  // load as 16 lanes of two bytes and two shifts make the even ones int16, one the odd ones, where
  // `vpmovsxbw` widened 16 at a time. The same products in each block's exact int32 sum: the same bits.
  bool split = false;

  float row_scale(int64_t n) const { return scales ? scales[n] : 1.f; }  // group scales: applied per block

  // A tile's sums, lane r * MB + j for weight row n + r and activation row m + j, scaled by their rows' scales.
  template <int R, int MB>
  void set_tile(const float* sums, int64_t n, int64_t m) const {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j) y.set((m + j) * N + n + r, sums[r * MB + j] * row_scale(n + r));
  }
};

}  // namespace baichuan_cpu_gemv

#if defined(BAICHUAN_AVX512)
#include "int8_tile_avx512.h"
#else
#include "int8_tile_avx2.h"
#endif
