// Short bf16 prompts on AMX tiles (avx512bf16 build, CPUs with AMX-BF16): out (M, N) = x (M, K) @ weight (N, K).T,
// bf16 in and out, fp32 sums. torch's bf16 GEMM (oneDNN) runs on AMX too, but reorders the whole weight on every
// call, which a product of a few dozen rows does not pay back: up to ~128 rows this took 0.44-0.80 of its time on
// the 1.29B shapes (benchmarks/README.md); at 512 rows it is no faster, and those stay with torch.
//
// The weight's rows are the A tiles, read where they lie (16 rows of 32 values, a row's stride apart): the only
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

// Output blocks [b0, b1) of 32 weight rows each, over every row of x.
BAICHUAN_AMX_FN void run_blocks(const uint16_t* W, const uint8_t* xp, uint16_t* Y, int64_t M, int64_t N, int64_t K,
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
  const int64_t row_lines = K * 2 / 64, block_lines = 32 * row_lines;
  // the next block's lines spread over this block's steps
  const int64_t per_step = (block_lines + steps * (row_tiles / 2) - 1) / (steps * (row_tiles / 2));
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w0 = W + b * 32 * K;
    const uint16_t* w1 = w0 + 16 * K;
    const char* next = reinterpret_cast<const char*>(W + std::min(b + 1, blocks - 1) * 32 * K);
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
          _mm_prefetch(next + line / row_lines * K * 2 + line % row_lines * 64, _MM_HINT_T1);
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      // c[q][i * 16 + j]: output b * 32 + (q / 2) * 16 + i of row (rt + q % 2) * 16 + j
      for (int q = 0; q < 4; ++q) {
        const int64_t n0 = b * 32 + q / 2 * 16;
        for (int j = 0; j < 16; ++j) {
          const int64_t m = (rt + q % 2) * 16 + j;
          if (m >= M) break;
          const __m512 sums = _mm512_i32gather_ps(column, c[q] + j, 4);
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

torch::Tensor amx_bf16_matmul(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(amx_ready(), "amx_bf16_matmul: this build or CPU has no AMX-BF16 (see amx_ready)");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.device().is_cpu() && weight.device().is_cpu(),
              "amx_bf16_matmul: x (M, K) and weight (N, K) on the CPU");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16,
              "amx_bf16_matmul: x and the weight must be bf16");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "amx_bf16_matmul: x and the weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "amx_bf16_matmul: x has ", K, " inputs, the weight ", weight.size(1));
  TORCH_CHECK(N % 32 == 0 && K % 32 == 0 && K > 0, "amx_bf16_matmul: outputs and inputs must be multiples of 32, "
              "got N=", N, ", K=", K);
  torch::Tensor y = torch::empty({M, N}, x.options());
#if defined(BAICHUAN_AMX)
  if (M == 0 || N == 0) return y;
  const int64_t Mp = (M + 31) / 32 * 32;
  torch::Tensor packed = torch::empty({K / 32, Mp / 16, 256}, x.options().dtype(torch::kInt));
  pack_rows(reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>()), M, K, Mp,
            reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()));
  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) { run_blocks(W, xp, Y, M, N, K, b0, b1); });
#endif
  return y;
}

}  // namespace

void register_prompt_amx(pybind11::module_& m) {
  m.def("amx_ready", &amx_ready, "whether amx_bf16_matmul runs here: built with it, AMX-BF16, tiles permitted");
  m.def("amx_bf16_matmul", &amx_bf16_matmul,
        "out (M, N) = x (M, K) @ weight (N, K).T on AMX tiles, bf16 in and out, N and K multiples of 32");
}

}  // namespace baichuan_cpu_gemv
