// Prompts on AMX tiles (avx512bf16 build, CPUs with AMX-BF16): out (M, N) = x (M, K) @ w (N, K).T, bf16 x and out, fp32
// sums, for bf16 weights (`amx_bf16_matmul`), int8 codes with a scale a row (`amx_int8_matmul`) and int4 codes with a
// scale and zero a group (`amx_int4_matmul`). torch's bf16 GEMM (oneDNN) runs on AMX too, but reorders the whole
// weight on every call, which a product of a few hundred rows does not pay back: from 16 to 256 rows this takes
// 0.58-0.93 of its time on the 1.29B shapes (benchmarks/README.md); past that bf16 products stay with torch. Quantized
// weights had our mat-vecs, built for a few rows, or a dequantized copy in torch's GEMM, slower up to ~1024 rows.
//
// The weight's rows are the A tiles (16 rows of 32 values). x is B, the operand AMX needs in pairs of k interleaved
// ("VNNI" order): repacked once per call (a gather per tile row), a pair of row tiles' steps together. C tiles are then
// (16 outputs x 16 rows), transposed on the way out. A task takes blocks of 32 outputs (2 A tiles) across x's rows
// (2 B tiles at a time: 4 C tiles, the 8 tiles all used; 1 and 2 C tiles where x's rows end in the first B tile),
// in one of two ways:
// - a few rows (up to kFewRowPairs pairs): block by block, all of K at once. bf16 rows are read where they lie; int8
//   and int4 rows are widened to bf16 into a buffer of the task's in tile order. The next block's rows are prefetched
//   into L2 meanwhile (bf16 too since its decode batches use one row tile: 0.87-0.95 of the time at 5 and 8 rows,
//   0.74-0.93 at 160, 0.80-1.14 at 32; Emerald Rapids, 1.29B shapes);
// - more: a group of blocks copied (or widened) into tile order (which also spares A tile loads whose rows lie a
//   multiple of 4 KB apart, in the same cache sets), then K in chunks of kChunkSteps steps, each chunk of the group's
//   A tiles kept in L2 while every row pair's B tiles of that chunk pass through L1 once for the whole group; C tiles
//   go to memory between chunks. Rows come kPanelPairs pairs (a panel) at a time.

#include "kernels.h"

#if defined(__x86_64__) && defined(__AVX512BF16__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define BAICHUAN_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstring>
#include <vector>

namespace baichuan_cpu_gemv {

#if defined(BAICHUAN_AMX)
#define BAICHUAN_AMX_FN __attribute__((target("amx-tile,amx-bf16")))

namespace {
struct TileConfig {  // the layout `ldtilecfg` reads (palette 1)
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
}  // namespace

// amx_ready, configure_tiles and pack_rows serve cpu_attention_amx.cpp and cpu_amx_int8.cpp too.
// CPUID says AMX-TILE and AMX-BF16, and Linux lets this process use the tile state (it must be asked for once).
bool amx_ready() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 22))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

// Tiles 0-7 of these shapes (rows, bytes a row).
BAICHUAN_AMX_FN void configure_tiles(const uint8_t (&rows)[8], const uint16_t (&colsb)[8]) {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.rows[i] = rows[i];
    config.colsb[i] = colsb[i];
  }
  // GCC 12 drops the stores above as dead where this is not inlined (ldtilecfg then reads garbage and faults)
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// All 8 tiles 16 rows of 64 bytes, the one shape every product here uses.
BAICHUAN_AMX_FN void configure_tiles() {
  configure_tiles({16, 16, 16, 16, 16, 16, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64});
}

// x (M, K) bf16, its rows row_pairs 32-bit pairs apart, as B tiles, 1 KB each, [Mp/32 pairs][K/32 steps][2 row tiles]
// [16 pairs of k][16 rows][2 values]; rows past M are zero.
void pack_rows(const uint32_t* x, int64_t M, int64_t K, int64_t Mp, uint32_t* out, int64_t row_pairs) {
  const int64_t steps = K / 32;
  at::parallel_for(0, Mp / 16 * steps, 16, [&](int64_t t0, int64_t t1) {
    const __m512i offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int(row_pairs)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t step = t / 2 % steps, first = t / 2 / steps * 32 + t % 2 * 16;
      uint32_t* tile = out + t * 256;
      const int64_t rows = std::min<int64_t>(16, M - first);
      if (rows <= 0) {
        std::memset(tile, 0, 1024);
        continue;
      }
      const __mmask16 valid = __mmask16((1u << rows) - 1);
      const uint32_t* base = x + first * row_pairs + step * 16;
      for (int p = 0; p < 16; ++p)
        _mm512_storeu_si512(tile + p * 16,
                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, offsets, base + p, 4));
    }
  });
}

namespace {

constexpr int64_t kFewRowPairs = 8;   // up to 256 rows: block by block
constexpr int64_t kChunkSteps = 8;    // 256 values of K: a group's A tiles for a chunk, 16 KB a block
constexpr int64_t kPanelPairs = 16;   // 512 rows: the group's C tiles, 4 KB a block and pair, stay in L2
constexpr int64_t kGroupBytes = 1 << 20;  // a group of blocks in tile order, at most 8 of them
constexpr int64_t kMaxGroup = 8;

// Where a block's A tiles lie: tile t (0, 1) of step s at `values + s * step + t * second`, its rows `stride` bytes
// apart.
struct BlockTiles {
  const uint16_t* values;
  int64_t step, second, stride;
};

// A block of 32 rows in tile order: [K/32 steps][2 tiles][16 rows][32 values].
inline BlockTiles tile_order(const uint16_t* tiles) { return {tiles, 1024, 512, 64}; }
inline uint16_t* tile_row(uint16_t* tiles, int64_t r) { return tiles + r / 16 * 512 + r % 16 * 32; }

// The weights `run_blocks` multiplies, 32 rows (a block) at a time: `into_tiles` in tile order into a buffer (copied,
// or widened to bf16); bf16 rows also where they lie (kInPlace: `rows_of`), int8 and int4 only widened. Each gives
// `block_start` and `block_bytes` for the prefetch of the next block.
struct Bf16Rows {
  static constexpr bool kScaled = false, kInPlace = true;
  const uint16_t* weight;
  int64_t K;
  const uint16_t* rows_of(int64_t b) const { return weight + b * 32 * K; }
  const void* block_start(int64_t b) const { return rows_of(b); }
  int64_t block_bytes() const { return 64 * K; }
  BAICHUAN_AMX_FN void into_tiles(int64_t b, uint16_t* tiles) const {
    for (int64_t r = 0; r < 32; ++r) {
      const uint16_t* w = weight + (b * 32 + r) * K;
      uint16_t* o = tile_row(tiles, r);
      for (int64_t k = 0; k < K; k += 32) _mm512_store_si512(o + k * 32, _mm512_loadu_si512(w + k));
    }
  }
};

// int8 codes with per-row scales: the codes widened exactly (|code| <= 127 fits bf16's 8 significant bits), the
// scales applied to the sums.
struct Int8Rows {
  static constexpr bool kScaled = true, kInPlace = false;
  const int8_t* codes;
  const float* scales;
  int64_t K;
  const void* block_start(int64_t b) const { return codes + b * 32 * K; }
  int64_t block_bytes() const { return 32 * K; }
  BAICHUAN_AMX_FN void into_tiles(int64_t b, uint16_t* tiles) const {
    for (int64_t r = 0; r < 32; ++r) {
      const int8_t* c = codes + (b * 32 + r) * K;
      uint16_t* o = tile_row(tiles, r);
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + k))));
        _mm256_store_si256((__m256i*)(o + k / 32 * 1024 + k % 32), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
};

// int4 codes, two a byte (column 2j in the low nibble), with a bf16 scale and zero per group of G inputs and output
// (K/G, N, 2): w = (q - 8) * scale + zero, rounded to bf16 as `dequantize_int4` (cpu_prefill.cpp) rounds it.
struct Int4Rows {
  static constexpr bool kScaled = false, kInPlace = false;
  const uint8_t* packed;
  const uint16_t* scales_and_zeros;
  int64_t N, K, G;
  const void* block_start(int64_t b) const { return packed + b * 32 * (K / 2); }
  int64_t block_bytes() const { return 32 * K / 2; }
  static float value(uint16_t bits) {
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
  BAICHUAN_AMX_FN void into_tiles(int64_t b, uint16_t* tiles) const {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t n = b * 32 + r;
      const uint8_t* p = packed + n * (K / 2);
      uint16_t* o = tile_row(tiles, r);
      for (int64_t g = 0; g < K / G; ++g) {
        const float scale = value(scales_and_zeros[(g * N + n) * 2]);
        const float zero = value(scales_and_zeros[(g * N + n) * 2 + 1]);
        const __m512 s = _mm512_set1_ps(scale), c = _mm512_set1_ps(zero - 8.0f * scale);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {  // 16 bytes: 32 codes, one step
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(p + k / 2));
          const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
          const __m128i halves[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // in column order
          for (int h = 0; h < 2; ++h) {
            const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(halves[h])), s, c);
            _mm256_store_si256((__m256i*)(o + k * 32 + 16 * h), (__m256i)_mm512_cvtneps_pbh(w));
          }
        }
      }
    }
  }
};

// 16 rows of 16 floats (row stride 16) as their 16 columns: unpacks of 1 and 2 lanes, then of 4 and 8 (128-bit
// lanes). Was 16 gathers a tile.
BAICHUAN_AMX_FN inline void transpose16(const float* c, __m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + 16 * i);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// One block's 4 C tiles over steps [s0, s1) of a row pair (xt: its B tiles), from zero or from the sums in c (1024
// floats); the sums are left in c. Meanwhile up to per_step lines a step from `prefetch` on, short of prefetch_end.
// A pair whose second row tile lies past x's rows (`first_tile_only`: up to 16 rows, as a decode batch) multiplies
// its first alone, half the tile products: at 8 rows 0.57-0.73 of the time (bf16, 1.29B shapes, Emerald Rapids).
BAICHUAN_AMX_FN inline void multiply_steps(const BlockTiles& a, const uint8_t* xt, int64_t s0, int64_t s1, bool resume,
                                           float* c, const char*& prefetch, const char* prefetch_end,
                                           int64_t per_step, bool first_tile_only) {
  if (resume) {
    _tile_loadd(0, c, 64);
    _tile_loadd(1, c + 256, 64);
    _tile_loadd(2, c + 512, 64);
    _tile_loadd(3, c + 768, 64);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = s0; s < s1; ++s) {
    _tile_loadd(4, a.values + s * a.step, a.stride);
    _tile_loadd(5, a.values + s * a.step + a.second, a.stride);
    _tile_loadd(6, xt + s * 2048, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (!first_tile_only) {
      _tile_loadd(7, xt + s * 2048 + 1024, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    for (int64_t i = 0; i < per_step && prefetch < prefetch_end; ++i, prefetch += 64)
      _mm_prefetch(prefetch, _MM_HINT_T1);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
}

// The sums c of block b and row pair `pair` (c[q * 256 + i * 16 + j]: output b * 32 + (q / 2) * 16 + i of row
// (2 * pair + q % 2) * 16 + j), scaled where the weights have scales, rounded into Y.
template <class Rows>
BAICHUAN_AMX_FN void store_sums(const Rows& weights, const float* c, int64_t b, int64_t pair, uint16_t* Y, int64_t M,
                                int64_t N) {
  for (int q = 0; q < 4; ++q) {
    const int64_t n0 = b * 32 + q / 2 * 16;
    __m512 scale = _mm512_set1_ps(1.0f);
    if constexpr (Rows::kScaled) scale = _mm512_loadu_ps(weights.scales + n0);
    __m512 rows[16];
    transpose16(c + q * 256, rows);
    for (int j = 0; j < 16; ++j) {
      const int64_t m = (2 * pair + q % 2) * 16 + j;
      if (m >= M) break;
      const __m512 sums = Rows::kScaled ? _mm512_mul_ps(rows[j], scale) : rows[j];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(sums));
    }
  }
}

// A few rows: block by block over all of K.
template <class Rows>
BAICHUAN_AMX_FN void few_rows(const Rows& weights, const uint8_t* xp, uint16_t* Y, int64_t M, int64_t N, int64_t K,
                              int64_t pairs, int64_t b0, int64_t b1) {
  const int64_t steps = K / 32;
  std::vector<__m512i> buffer(Rows::kInPlace ? 0 : K);  // a block of 32 rows of K bf16
  uint16_t* tiles = reinterpret_cast<uint16_t*>(buffer.data());
  alignas(64) float c[1024];
  for (int64_t b = b0; b < b1; ++b) {
    BlockTiles a;
    const char *next = nullptr, *next_end = nullptr;
    int64_t per_step = 0;
    if constexpr (Rows::kInPlace) {
      a = {weights.rows_of(b), 32, 16 * K, 2 * K};
    } else {
      weights.into_tiles(b, tiles);
      a = tile_order(tiles);
    }
    if (b + 1 < b1) {  // the next block's lines, spread over this block's steps
      next = static_cast<const char*>(weights.block_start(b + 1));
      next_end = next + weights.block_bytes();
      per_step = (weights.block_bytes() / 64 + steps * pairs - 1) / (steps * pairs);
    }
    for (int64_t pair = 0; pair < pairs; ++pair) {
      multiply_steps(a, xp + pair * steps * 2048, 0, steps, false, c, next, next_end, per_step, M - 32 * pair <= 16);
      store_sums(weights, c, b, pair, Y, M, N);
    }
  }
}

// More rows: groups of blocks in tile order, K in chunks, a panel of row pairs at a time.
template <class Rows>
BAICHUAN_AMX_FN void many_rows(const Rows& weights, const uint8_t* xp, uint16_t* Y, int64_t M, int64_t N, int64_t K,
                               int64_t pairs, int64_t b0, int64_t b1) {
  const int64_t steps = K / 32;
  const int64_t group = std::clamp<int64_t>(kGroupBytes / (64 * K), 1, kMaxGroup);
  const int64_t panel = std::min(kPanelPairs, pairs);
  std::vector<__m512i> buffer(group * K);  // the group's blocks of 32 rows of K bf16
  uint16_t* tiles = reinterpret_cast<uint16_t*>(buffer.data());
  std::vector<__m512i> sums(group * panel * 64);  // 4 C tiles a block and row pair
  float* c = reinterpret_cast<float*>(sums.data());
  for (int64_t p0 = 0; p0 < pairs; p0 += panel) {
    const int64_t p1 = std::min(pairs, p0 + panel);
    for (int64_t g0 = b0; g0 < b1; g0 += group) {
      const int64_t g1 = std::min(b1, g0 + group);
      for (int64_t b = g0; b < g1; ++b) weights.into_tiles(b, tiles + (b - g0) * 32 * K);
      for (int64_t s0 = 0; s0 < steps; s0 += kChunkSteps) {
        const int64_t s1 = std::min(steps, s0 + kChunkSteps);
        for (int64_t pair = p0; pair < p1; ++pair)
          for (int64_t b = g0; b < g1; ++b) {
            float* cb = c + ((b - g0) * panel + pair - p0) * 1024;
            const char* none = nullptr;
            multiply_steps(tile_order(tiles + (b - g0) * 32 * K), xp + pair * steps * 2048, s0, s1, s0 > 0, cb,
                           none, none, 0, M - 32 * pair <= 16);
            if (s1 == steps) store_sums(weights, cb, b, pair, Y, M, N);
          }
      }
    }
  }
}

// Output blocks [b0, b1) of 32 weight rows each, over every row of x.
template <class Rows>
BAICHUAN_AMX_FN void run_blocks(const Rows& weights, const uint8_t* xp, uint16_t* Y, int64_t M, int64_t N, int64_t K,
                                int64_t b0, int64_t b1) {
  configure_tiles();
  const int64_t pairs = (M + 31) / 32;
  if (pairs <= kFewRowPairs)
    few_rows(weights, xp, Y, M, N, K, pairs, b0, b1);
  else
    many_rows(weights, xp, Y, M, N, K, pairs, b0, b1);
  _tile_release();
}
}  // namespace
#else
bool amx_ready() { return false; }
#endif

namespace {

// The checks the three products share (weight_inputs: K as the weight stores it).
void check_product(const char* name, const at::Tensor& x, const at::Tensor& weight, int64_t weight_inputs) {
  TORCH_CHECK(amx_ready(), name, ": this build or CPU has no AMX-BF16 (see amx_ready)");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.device().is_cpu() && weight.device().is_cpu(), name,
              ": x (M, K) and weight (N, K) on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, ": x must be bf16");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), name, ": x and the weight must be contiguous");
  TORCH_CHECK(weight_inputs == x.size(1), name, ": x has ", x.size(1), " inputs, the weight ", weight_inputs);
  TORCH_CHECK(weight.size(0) % 32 == 0 && x.size(1) % 32 == 0 && x.size(1) > 0, name,
              ": outputs and inputs must be multiples of 32, got N=", weight.size(0), ", K=", x.size(1));
}

template <class Rows>
at::Tensor amx_matmul(const at::Tensor& x, const Rows& weights, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
#if defined(BAICHUAN_AMX)
  if (M == 0 || N == 0) return y;
  const int64_t Mp = (M + 31) / 32 * 32;
  at::Tensor packed = at::empty({Mp / 32, K / 32, 512}, x.options().dtype(at::kInt));
  pack_rows(reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>()), M, K, Mp,
            reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), K / 2);
  const auto* xp = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) { run_blocks(weights, xp, Y, M, N, K, b0, b1); });
#endif
  return y;
}

}  // namespace

at::Tensor amx_bf16_matmul(const at::Tensor& x, const at::Tensor& weight) {
  check_product("amx_bf16_matmul", x, weight, weight.size(1));
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "amx_bf16_matmul: the weight must be bf16");
#if defined(BAICHUAN_AMX)
  const Bf16Rows rows{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), x.size(1)};
  return amx_matmul(x, rows, weight.size(0));
#else
  return {};
#endif
}

at::Tensor amx_int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  check_product("amx_int8_matmul", x, weight, weight.size(1));
  TORCH_CHECK(weight.scalar_type() == at::kChar, "amx_int8_matmul: the weight must be int8 codes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 1 &&
                  scales.size(0) == weight.size(0),
              "amx_int8_matmul: scales must be contiguous fp32 (", weight.size(0), ",)");
#if defined(BAICHUAN_AMX)
  return amx_matmul(x, Int8Rows{weight.data_ptr<int8_t>(), scales.data_ptr<float>(), x.size(1)}, weight.size(0));
#else
  return {};
#endif
}

at::Tensor amx_int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                           int64_t group_size) {
  check_product("amx_int4_matmul", x, packed, packed.size(1) * 2);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "amx_int4_matmul: the weight must be int4 codes packed in uint8");
  const int64_t N = packed.size(0), K = x.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "amx_int4_matmul: the group size must be a multiple of 32 dividing K, got ", group_size);
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == K / group_size &&
                  scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
              "amx_int4_matmul: scales_and_zeros must be contiguous bf16 (K/group_size, N, 2)");
#if defined(BAICHUAN_AMX)
  const auto* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  return amx_matmul(x, Int4Rows{packed.data_ptr<uint8_t>(), sz, N, K, group_size}, N);
#else
  return {};
#endif
}

}  // namespace baichuan_cpu_gemv
