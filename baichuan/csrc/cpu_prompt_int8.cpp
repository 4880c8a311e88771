// Prompt-sized products of int8 weights for the avx2 target, where bf16 is not native and the prompt path
// otherwise dequantizes to fp32 for torch's GEMM (cpu_prefill.cpp). Activations take the int16 codes of the decode
// kernel (cpu_gemv.cpp, `quantize_activations`: per block of B inputs, scale = block absmax / 32767) and the same
// arithmetic: exact int32 sums of `vpmaddwd` products per block, then in fp32 out += float(sum) * scale, block
// after block, and at the end out *= the row's scale. So a prompt row gets the very bits the decode kernel gives
// it, at GEMM speed:
//
//   int8 (N, K), per-row fp32 scales (N,):     B = the decode kernel's block for K (`int8_block`, up to 256);
//   int8 (N, K), bf16 group scales (N, K/G):  B = G, each block's scale = group scale * activation scale.
//
// Each task repacks 64 output columns' codes to [K/2][64 columns][2 inputs], so that one 16-byte load widened to
// int16 is 8 columns x 2 inputs against a broadcast of 2 inputs of one activation row (`vpmaddwd`: 16 products
// and pairwise sums an instruction, against 8 for an fp32 FMA). Tiles of 4 rows x 16 columns keep 8 int32 sums,
// 2 weight vectors and a broadcast in registers; 256 inputs of the block's codes (16 KB) stay in L1 while every
// activation row passes them, and the fp32 sums in `out` stay in L2.

#include <immintrin.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "gemv.h"  // add_pair_sums; kernels.h

namespace baichuan_cpu_gemv {

namespace {

constexpr int64_t kBlockCols = 64;    // output columns a task repacks
constexpr int64_t kTileRows = 4;      // activation rows of a tile
constexpr int64_t kTileCols = 16;     // output columns of a tile: two vectors of 8 int32 sums
constexpr int64_t kChunkInputs = 256; // inputs whose codes every activation row passes before the next ones

// Columns [n0, n0 + width) of w (N, K) -> wb [K/2][width][2]: per 8 columns x 16 inputs, a transpose of 8 x 8
// pairs of bytes (a scalar copy of each pair had taken ~2 ms of a 4608x1536 layer, as long as 16 rows' products).
void repack_int8(const int8_t* w, int64_t n0, int64_t width, int64_t K, int8_t* wb) {
  for (int64_t c0 = 0; c0 < width; c0 += 8) {
    const int8_t* rows = w + (n0 + c0) * K;
    for (int64_t k = 0; k < K; k += 16) {
      __m128i r[8], a[8], b[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128((const __m128i*)(rows + i * K + k));
      for (int i = 0; i < 4; ++i) {  // a[2i], a[2i+1]: pairs 0-3 and 4-7 of columns 2i and 2i+1, interleaved
        a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
      }
      for (int h = 0; h < 2; ++h)  // b[4h + j]: pairs 2j and 2j+1 of columns 4h..4h+3
        for (int j = 0; j < 2; ++j) {
          b[4 * h + 2 * j] = _mm_unpacklo_epi32(a[4 * h + j], a[4 * h + 2 + j]);
          b[4 * h + 2 * j + 1] = _mm_unpackhi_epi32(a[4 * h + j], a[4 * h + 2 + j]);
        }
      int8_t* out = wb + ((k / 2) * width + c0) * 2;
      for (int j = 0; j < 4; ++j) {  // pairs 2j and 2j+1 of all 8 columns
        _mm_storeu_si128((__m128i*)(out + (2 * j) * width * 2), _mm_unpacklo_epi64(b[j], b[4 + j]));
        _mm_storeu_si128((__m128i*)(out + (2 * j + 1) * width * 2), _mm_unpackhi_epi64(b[j], b[4 + j]));
      }
    }
  }
}

// R activation rows x 16 columns over `count` blocks of B inputs from block b: out[r, j] += each block's share,
// float(int32 sum) * scale, where the scale is the row's block scale xs[r, b] times, with group scales, the
// column's (ws [blocks][width], fp32). xq and wb point at block b's first input of the tile's first row and
// column, ws at the tile's first column.
template <int R, bool kGroups>
void int8_tile(const int16_t* xq, const float* xs, int64_t K, int64_t blocks, int64_t B, int64_t b, int64_t count,
               const int8_t* wb, const float* ws, int64_t width, float* out, int64_t ldo) {
  for (int64_t j = 0; j < count; ++j, ++b) {
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int64_t k = j * B; k < (j + 1) * B; k += 2) {
      const int8_t* w = wb + k * width;  // (k / 2) * width * 2
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)w));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + 16)));
      for (int r = 0; r < R; ++r) {
        int32_t two;
        std::memcpy(&two, xq + r * K + k, sizeof two);
        const __m256i xv = _mm256_set1_epi32(two);
        dot[r][0] = add_pair_sums(dot[r][0], w0, xv);
        dot[r][1] = add_pair_sums(dot[r][1], w1, xv);
        // As in cpu_prefill.cpp's int4 tile: keeps the compiler from re-associating the adds into a tree that
        // spills the products.
        asm("" : "+x"(dot[r][0]), "+x"(dot[r][1]));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 row_scale = _mm256_set1_ps(xs[r * blocks + b]);
      for (int c = 0; c < 2; ++c) {
        // The decode kernel's rounding: the scales' product first, then one FMA into the running sum.
        const __m256 scale = kGroups ? _mm256_mul_ps(row_scale, _mm256_loadu_ps(ws + b * width + c * 8)) : row_scale;
        float* o = out + r * ldo + c * 8;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][c]), scale, _mm256_loadu_ps(o)));
      }
    }
  }
}

using TileFn = void (*)(const int16_t*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const int8_t*,
                        const float*, int64_t, float*, int64_t);

template <bool kGroups>
TileFn tile_for(int64_t rows) {
  switch (rows) {
    case 1: return &int8_tile<1, kGroups>;
    case 2: return &int8_tile<2, kGroups>;
    case 3: return &int8_tile<3, kGroups>;
    default: return &int8_tile<4, kGroups>;
  }
}

}  // namespace

// out (M, N) fp32 = x (M, K) (fp32 or bf16) @ (int8 weight (N, K) scaled).T, with scales fp32 (N,) per row or bf16
// (N, K/G) per group of G inputs.
void int8_matmul_int16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor out) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight: contiguous int8 (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kTileCols == 0, "output features must be a multiple of 16, got ", N);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) == K &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: contiguous fp32 or bf16 (M, ", K, ") on the CPU");
  const int64_t M = x.size(0);
  TORCH_CHECK(
      out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == M && out.size(1) == N,
      "out: contiguous fp32 (", M, ", ", N, ")");
  const bool grouped = scales.dim() == 2;
  const int64_t B = int8_scales_block(scales, N, K);  // at most kChunkInputs
  if (M == 0) return;
  const auto [codes, block_scales] = int16_activations(x, B);
  const int64_t blocks = K / B, step = kChunkInputs / B;  // whole blocks a chunk
  const int16_t* xq = codes.data_ptr<int16_t>();
  const float* xs = block_scales.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* row_scales = grouped ? nullptr : scales.data_ptr<float>();
  const uint16_t* group_scales = grouped ? reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()) : nullptr;
  float* y = out.data_ptr<float>();
  const TileFn full = grouped ? tile_for<true>(kTileRows) : tile_for<false>(kTileRows);
  at::parallel_for(0, (N + kBlockCols - 1) / kBlockCols, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> wb(K * kBlockCols);
    std::vector<float> ws(grouped ? blocks * kBlockCols : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kBlockCols, width = std::min(kBlockCols, N - n0);
      repack_int8(w, n0, width, K, wb.data());
      for (int64_t b = 0; grouped && b < blocks; ++b)
        for (int64_t c = 0; c < width; ++c) {
          const uint32_t bits = uint32_t(group_scales[(n0 + c) * blocks + b]) << 16;
          std::memcpy(&ws[b * width + c], &bits, sizeof(float));
        }
      for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, width * sizeof(float));
      for (int64_t b = 0; b < blocks; b += step) {
        const int64_t count = std::min(step, blocks - b);
        for (int64_t m = 0; m < M; m += kTileRows) {
          const int64_t rows = std::min(kTileRows, M - m);
          const TileFn tile = rows == kTileRows ? full : grouped ? tile_for<true>(rows) : tile_for<false>(rows);
          for (int64_t c0 = 0; c0 < width; c0 += kTileCols)
            tile(xq + m * K + b * B, xs + m * blocks, K, blocks, B, b, count, wb.data() + b * B * width + c0 * 2,
                 grouped ? ws.data() + c0 : nullptr, width, y + m * N + n0 + c0, N);
        }
      }
      if (!grouped)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t c = 0; c < width; c += 8) {
            float* o = y + m * N + n0 + c;
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), _mm256_loadu_ps(row_scales + n0 + c)));
          }
    }
  });
}

}  // namespace baichuan_cpu_gemv
