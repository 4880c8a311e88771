// Short prompts on AMX tiles (avx512bf16 build, CPUs with AMX-BF16): out (M, N) = x (M, K) @ w (N, K).T, bf16 x and
// out, fp32 sums, for bf16 weights (`amx_bf16_matmul`), int8 codes with a scale a row (`amx_int8_matmul`) and int4
// codes with a scale and zero a group (`amx_int4_matmul`). torch's bf16 GEMM (oneDNN) runs on AMX too, but reorders
// the whole weight on every call, which a product of a few dozen rows does not pay back: up to ~128 rows this took
// 0.44-0.80 of its time on the 1.29B shapes (benchmarks/README.md); at 512 rows it is no faster, and those stay with
// torch. Quantized weights had our mat-vecs, built for a few rows, or a dequantized copy in torch's GEMM.
//
// The weight's rows are the A tiles (16 rows of 32 values, a row's stride apart): bf16 read where they lie, int8 and
// int4 widened to bf16 32 rows at a time into a buffer of the task's (in L2 while all of x's tiles pass). The only
// operand AMX needs in pairs of k interleaved ("VNNI" order) is B, and here that is x, repacked once per call
// (a gather per tile row). C tiles are then (16 outputs x 16 rows) and are transposed on the way out. Each task
// takes 32 outputs (2 A tiles) across all rows (2 B tiles at a time: 4 C tiles, the 8 tiles all used) and
// prefetches the next task's weight rows into L2 meanwhile.

#include <ATen/Parallel.h>
#include <torch/extension.h>

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
namespace {

#if defined(BAICHUAN_AMX)
#define BAICHUAN_AMX_FN __attribute__((target("amx-tile,amx-bf16")))

struct TileConfig {  // the layout `ldtilecfg` reads (palette 1)
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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

// x (M, K) bf16 as B tiles, 1 KB each, [K/32 steps][Mp/16 row tiles][16 pairs of k][16 rows][2 values]; rows past M
// are zero.
void pack_rows(const uint32_t* x, int64_t M, int64_t K, int64_t Mp, uint32_t* out) {
  const int64_t pairs = K / 2, row_tiles = Mp / 16;
  at::parallel_for(0, K / 32 * row_tiles, 16, [&](int64_t t0, int64_t t1) {
    const __m512i offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int(pairs)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t step = t / row_tiles, first = t % row_tiles * 16;
      uint32_t* tile = out + t * 256;
      const int64_t rows = std::min<int64_t>(16, M - first);
      if (rows <= 0) {
        std::memset(tile, 0, 1024);
        continue;
      }
      const __mmask16 valid = __mmask16((1u << rows) - 1);
      const uint32_t* base = x + first * pairs + step * 16;
      for (int p = 0; p < 16; ++p)
        _mm512_storeu_si512(tile + p * 16,
                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, offsets, base + p, 4));
    }
  });
}

// The weights `run_blocks` multiplies, 32 rows (a block) at a time, as bf16 rows K apart for the A tiles: read in
// place (bf16), or widened into a buffer of the task's, which stays in L2 for all the rows' tiles (int8, int4).
struct Bf16Rows {
  static constexpr bool kWidens = false, kScaled = false;
  const uint16_t* weight;
  int64_t K;
  const void* block_start(int64_t b) const { return weight + b * 32 * K; }
  int64_t row_bytes() const { return K * 2; }
  const uint16_t* block(int64_t b, uint16_t*) const { return weight + b * 32 * K; }
};

// int8 codes with per-row scales: the codes widened exactly (|code| <= 127 fits bf16's 8 significant bits), the
// scales applied to the sums.
struct Int8Rows {
  static constexpr bool kWidens = true, kScaled = true;
  const int8_t* codes;
  const float* scales;
  int64_t K;
  const void* block_start(int64_t b) const { return codes + b * 32 * K; }
  int64_t row_bytes() const { return K; }
  BAICHUAN_AMX_FN const uint16_t* block(int64_t b, uint16_t* out) const {
    const int8_t* c = codes + b * 32 * K;
    for (int64_t i = 0; i < 32 * K; i += 16) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + i))));
      _mm256_storeu_si256((__m256i*)(out + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
    return out;
  }
};

// int4 codes, two a byte (column 2j in the low nibble), with a bf16 scale and zero per group of G inputs and output
// (K/G, N, 2): w = (q - 8) * scale + zero, rounded to bf16 as `dequantize_int4` (cpu_prefill.cpp) rounds it.
struct Int4Rows {
  static constexpr bool kWidens = true, kScaled = false;
  const uint8_t* packed;
  const uint16_t* scales_and_zeros;
  int64_t N, K, G;
  const void* block_start(int64_t b) const { return packed + b * 32 * (K / 2); }
  int64_t row_bytes() const { return K / 2; }
  static float value(uint16_t bits) {
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
  BAICHUAN_AMX_FN const uint16_t* block(int64_t b, uint16_t* out) const {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t n = b * 32 + r;
      const uint8_t* p = packed + n * (K / 2);
      uint16_t* o = out + r * K;
      for (int64_t g = 0; g < K / G; ++g) {
        const float scale = value(scales_and_zeros[(g * N + n) * 2]);
        const float zero = value(scales_and_zeros[(g * N + n) * 2 + 1]);
        const __m512 s = _mm512_set1_ps(scale), c = _mm512_set1_ps(zero - 8.0f * scale);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {  // 16 bytes: 32 codes
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(p + k / 2));
          const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
          const __m128i halves[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // in column order
          for (int h = 0; h < 2; ++h) {
            const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(halves[h])), s, c);
            _mm256_storeu_si256((__m256i*)(o + k + 16 * h), (__m256i)_mm512_cvtneps_pbh(w));
          }
        }
      }
    }
    return out;
  }
};

// Output blocks [b0, b1) of 32 weight rows each, over every row of x.
template <class Rows>
BAICHUAN_AMX_FN void run_blocks(const Rows& weights, const uint8_t* xp, uint16_t* Y, int64_t M, int64_t N, int64_t K,
                                int64_t b0, int64_t b1) {
  const int64_t steps = K / 32, row_tiles = (M + 31) / 32 * 2, blocks = N / 32;
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.rows[i] = 16;
    config.colsb[i] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float c[4][256];
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  std::vector<uint16_t> widened(Rows::kWidens ? 32 * K : 0);
  const int64_t row_bytes = weights.row_bytes(), row_lines = row_bytes / 64, block_lines = 32 * row_lines;
  // the next block's lines spread over this block's steps
  const int64_t per_step = (block_lines + steps * (row_tiles / 2) - 1) / (steps * (row_tiles / 2));
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w0 = weights.block(b, widened.data());
    const uint16_t* w1 = w0 + 16 * K;
    const char* next = static_cast<const char*>(weights.block_start(std::min(b + 1, blocks - 1)));
    int64_t line = b + 1 < blocks ? 0 : block_lines;
    for (int64_t rt = 0; rt < row_tiles; rt += 2) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, w0 + s * 32, K * 2);
        _tile_loadd(5, w1 + s * 32, K * 2);
        _tile_loadd(6, xp + (s * row_tiles + rt) * 1024, 64);
        _tile_loadd(7, xp + (s * row_tiles + rt + 1) * 1024, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        for (int64_t i = 0; i < per_step && line < block_lines; ++i, ++line)
          _mm_prefetch(next + line / row_lines * row_bytes + line % row_lines * 64, _MM_HINT_T1);
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      // c[q][i * 16 + j]: output b * 32 + (q / 2) * 16 + i of row (rt + q % 2) * 16 + j
      for (int q = 0; q < 4; ++q) {
        const int64_t n0 = b * 32 + q / 2 * 16;
        __m512 scale = _mm512_set1_ps(1.0f);
        if constexpr (Rows::kScaled) scale = _mm512_loadu_ps(weights.scales + n0);
        for (int j = 0; j < 16; ++j) {
          const int64_t m = (rt + q % 2) * 16 + j;
          if (m >= M) break;
          __m512 sums = _mm512_i32gather_ps(column, c[q] + j, 4);
          if constexpr (Rows::kScaled) sums = _mm512_mul_ps(sums, scale);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(Y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(sums));
        }
      }
    }
  }
  _tile_release();
}
#else
bool amx_ready() { return false; }
#endif

// The checks the three products share (weight_inputs: K as the weight stores it).
void check_product(const char* name, const torch::Tensor& x, const torch::Tensor& weight, int64_t weight_inputs) {
  TORCH_CHECK(amx_ready(), name, ": this build or CPU has no AMX-BF16 (see amx_ready)");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.device().is_cpu() && weight.device().is_cpu(), name,
              ": x (M, K) and weight (N, K) on the CPU");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, name, ": x must be bf16");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), name, ": x and the weight must be contiguous");
  TORCH_CHECK(weight_inputs == x.size(1), name, ": x has ", x.size(1), " inputs, the weight ", weight_inputs);
  TORCH_CHECK(weight.size(0) % 32 == 0 && x.size(1) % 32 == 0 && x.size(1) > 0, name,
              ": outputs and inputs must be multiples of 32, got N=", weight.size(0), ", K=", x.size(1));
}

template <class Rows>
torch::Tensor amx_matmul(const torch::Tensor& x, const Rows& weights, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  torch::Tensor y = torch::empty({M, N}, x.options());
#if defined(BAICHUAN_AMX)
  if (M == 0 || N == 0) return y;
  const int64_t Mp = (M + 31) / 32 * 32;
  torch::Tensor packed = torch::empty({K / 32, Mp / 16, 256}, x.options().dtype(torch::kInt));
  pack_rows(reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>()), M, K, Mp,
            reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()));
  const auto* xp = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) { run_blocks(weights, xp, Y, M, N, K, b0, b1); });
#endif
  return y;
}

torch::Tensor amx_bf16_matmul(const torch::Tensor& x, const torch::Tensor& weight) {
  check_product("amx_bf16_matmul", x, weight, weight.size(1));
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16, "amx_bf16_matmul: the weight must be bf16");
#if defined(BAICHUAN_AMX)
  const Bf16Rows rows{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), x.size(1)};
  return amx_matmul(x, rows, weight.size(0));
#else
  return {};
#endif
}

torch::Tensor amx_int8_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales) {
  check_product("amx_int8_matmul", x, weight, weight.size(1));
  TORCH_CHECK(weight.scalar_type() == torch::kChar, "amx_int8_matmul: the weight must be int8 codes");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.dim() == 1 &&
                  scales.size(0) == weight.size(0),
              "amx_int8_matmul: scales must be contiguous fp32 (", weight.size(0), ",)");
#if defined(BAICHUAN_AMX)
  return amx_matmul(x, Int8Rows{weight.data_ptr<int8_t>(), scales.data_ptr<float>(), x.size(1)}, weight.size(0));
#else
  return {};
#endif
}

torch::Tensor amx_int4_matmul(const torch::Tensor& x, const torch::Tensor& packed,
                              const torch::Tensor& scales_and_zeros, int64_t group_size) {
  check_product("amx_int4_matmul", x, packed, packed.size(1) * 2);
  TORCH_CHECK(packed.scalar_type() == torch::kByte, "amx_int4_matmul: the weight must be int4 codes packed in uint8");
  const int64_t N = packed.size(0), K = x.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "amx_int4_matmul: the group size must be a multiple of 32 dividing K, got ", group_size);
  TORCH_CHECK(scales_and_zeros.scalar_type() == torch::kBFloat16 && scales_and_zeros.is_contiguous() &&
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

}  // namespace

void register_prompt_amx(pybind11::module_& m) {
  m.def("amx_ready", &amx_ready,
        "whether the amx_*_matmul kernels run here: built with them, AMX-BF16, tiles permitted");
  m.def("amx_bf16_matmul", &amx_bf16_matmul,
        "out (M, N) = x (M, K) @ weight (N, K).T on AMX tiles, bf16 in and out, N and K multiples of 32");
  m.def("amx_int8_matmul", &amx_int8_matmul,
        "out (M, N) = x (M, K) @ (weight (N, K) int8 * scales (N,) fp32).T on AMX tiles, bf16 x and out");
  m.def("amx_int4_matmul", &amx_int4_matmul,
        "out (M, N) = x (M, K) @ w.T, w the int4 packed (N, K/2) with bf16 scales_and_zeros (K/G, N, 2) dequantized "
        "to bf16, on AMX tiles, bf16 x and out");
}

}  // namespace baichuan_cpu_gemv
