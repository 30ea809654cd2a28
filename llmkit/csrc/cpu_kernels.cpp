// llmkit's one-row weight products on the CPU, as PyTorch custom ops: int8 weight-only y = x (q * scale[:, None])^T,
// float32 y = x w^T, and float32 attention of a decode step's query rows (the last two at the end of the file).
//
// torch.ops.llmkit_cpu.int8_weight_mm(x [M, K] float32, q [N, K] int8, scale [N] float32) -> [M, N] float32,
// the signature of ATen's _weight_int8pack_mm. Widening each int8 weight to float costs two instructions per 8
// weights before the multiply-add, which caps a float kernel below what memory delivers. So each row of x is
// carried as 16-bit integers instead (xq = round(x / sx), sx = max|x| / 32639: a step of 1/65278 of the row's
// largest value, finer than bfloat16's rounding) and the sums are integer dot products:
//   y[n] = sx * scale[n] * D[n],   D[n] = sum_k xq[k] q[n, k], computed exactly.
// AVX-512 VNNI multiplies unsigned by signed bytes (vpdpbusd, 64 per instruction), so xq is split into two signed
// bytes, xq = 256 hi + lo, and the weights are made unsigned by adding 128 (one xor): with u = q + 128,
//   D = 256 sum hi u + sum lo u - 128 sum xq.
// AVX2 multiplies 16-bit pairs (vpmaddwd) after widening 16 weights in one instruction. The portable loop computes
// the same integer D, so every path returns the same bits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iterator>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMKIT_X86 1
#endif

namespace {

// A row of x as 16-bit integers, and as the two signed bytes the VNNI kernel multiplies
struct QuantizedRow {
  static constexpr int32_t LIMIT = 127 * 256 + 127;  // the largest |xq| whose two bytes are both signed bytes
  float sx = 0;
  int64_t sum = 0;  // sum_k xq[k]
  std::vector<int16_t> xq;
  std::vector<int8_t> lo, hi;  // xq = 256 * hi + lo
};

void zero_row(QuantizedRow& r, bool finite) {  // zeros give zeros; an inf or nan gives nan, which the callers see
  std::fill(r.xq.begin(), r.xq.end(), 0);
  std::fill(r.lo.begin(), r.lo.end(), 0);
  std::fill(r.hi.begin(), r.hi.end(), 0);
  r.sum = 0;
  r.sx = finite ? 0.0f : NAN;
}

void quantize_row_portable(const float* x, int64_t K, QuantizedRow& r) {
  float amax = 0;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    amax = std::max(amax, std::fabs(x[k]));
    finite = finite && std::isfinite(x[k]);
  }
  if (!finite || amax == 0) return zero_row(r, finite);
  r.sum = 0;
  r.sx = amax / QuantizedRow::LIMIT;
  const float inv = QuantizedRow::LIMIT / amax;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t v = std::clamp(static_cast<int32_t>(std::lrintf(x[k] * inv)), -QuantizedRow::LIMIT,
                                 QuantizedRow::LIMIT);
    const int32_t h = (v + 128) >> 8;
    r.xq[k] = static_cast<int16_t>(v);
    r.hi[k] = static_cast<int8_t>(h);
    r.lo[k] = static_cast<int8_t>(v - 256 * h);
    r.sum += v;
  }
}

// D[n] = sum_k xq[k] q[n, k] for rows n0 <= n < n1
void dots_portable(const QuantizedRow& r, const int8_t* q, int64_t K, int64_t n0, int64_t n1, int64_t* D) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * K;
    int64_t sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += static_cast<int64_t>(r.xq[k]) * w[k];
    D[n] = sum;
  }
}

#ifdef LLMKIT_X86
__attribute__((target("avx2"))) inline int64_t hsum_epi32(__m256i v) {
  // widened to 64 bits first: eight partial sums of a chunk may together pass 2^31
  const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

// Four rows at a time; each chunk of 2048 columns is summed in 32 bits, which can't overflow there
// (8 lanes x 128 steps x 2 x 32767 x 128 < 2^31 per lane), then added in 64 bits.
__attribute__((target("avx2"))) void dots_avx2(const QuantizedRow& r, const int8_t* q, int64_t K, int64_t n0,
                                               int64_t n1, int64_t* D) {
  constexpr int64_t CHUNK = 2048;
  const int16_t* xq = r.xq.data();
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w[4] = {q + n * K, q + (n + 1) * K, q + (n + 2) * K, q + (n + 3) * K};
    int64_t total[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < K; c += CHUNK) {
      const int64_t end = std::min(K, c + CHUNK), end16 = c + ((end - c) & ~int64_t(15));
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
      for (int64_t k = c; k < end16; k += 16) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
        for (int j = 0; j < 4; ++j) {
          const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k)));
          acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(xv, wv));
        }
      }
      for (int j = 0; j < 4; ++j) {
        total[j] += hsum_epi32(acc[j]);
        for (int64_t k = end16; k < end; ++k) total[j] += static_cast<int64_t>(xq[k]) * w[j][k];
      }
    }
    for (int j = 0; j < 4; ++j) D[n + j] = total[j];
  }
  if (n < n1) dots_portable(r, q, K, n, n1, D);
}

__attribute__((target("avx512f,avx2"))) inline __m256i half(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// The four sums of a, b, c, d's 16 lanes each, as one vector
__attribute__((target("avx512f,avx2"))) inline __m128i hsum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(half(a), half(b)), _mm256_hadd_epi32(half(c), half(d)));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

#define LLMKIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2")))

// D[0..3] = 256 sum hi u + sum lo u - 128 sum xq for the four rows whose running sums are lo and hi
__attribute__((target("avx512f,avx2"))) inline void store4(const __m512i* lo, const __m512i* hi, int64_t sum,
                                                          int64_t* D) {
  alignas(16) int32_t h[4], l[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(h), hsum4(hi[0], hi[1], hi[2], hi[3]));
  _mm_store_si128(reinterpret_cast<__m128i*>(l), hsum4(lo[0], lo[1], lo[2], lo[3]));
  for (int j = 0; j < 4; ++j) D[j] = 256 * static_cast<int64_t>(h[j]) + l[j] - 128 * sum;
}

// lo += sum xl u and hi += sum xh u over the 64 weights at w where mask m is set; u = q + 128
LLMKIT_VNNI inline void vnni_step(const int8_t* w, __mmask64 m, __m512i xl, __m512i xh, __m512i& lo, __m512i& hi) {
  const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w), _mm512_set1_epi8(static_cast<char>(0x80)));
  lo = _mm512_dpbusd_epi32(lo, u, xl);
  hi = _mm512_dpbusd_epi32(hi, u, xh);
}

// vnni_step on the 64 columns from k, x's loaded from memory
LLMKIT_VNNI inline void vnni_step_at(const int8_t* w, const int8_t* xl, const int8_t* xh, int64_t k, __mmask64 m,
                                     __m512i& lo, __m512i& hi) {
  vnni_step(w + k, m, _mm512_maskz_loadu_epi8(m, xl + k), _mm512_maskz_loadu_epi8(m, xh + k), lo, hi);
}

// One row after another, so the weights are read in address order: four rows' loads interleaved (as the AVX2
// path does) left the processor's prefetchers behind, reading memory at under half the rate of this order (chapter
// 8 has the model's figures). Each product keeps two pairs of running sums (even and odd 64-column steps) to halve
// its chain of dependent adds; each is exact in 32 bits for K below 65536 (at most 255 x 128 x K). The last step
// loads only the columns that exist (zeros, which add nothing: x's are zero there).
LLMKIT_VNNI void dots_vnni(const QuantizedRow& r, const int8_t* q, int64_t K, int64_t n0, int64_t n1, int64_t* D) {
  const int8_t *xl = r.lo.data(), *xh = r.hi.data();
  const int64_t K64 = K & ~int64_t(63), K128 = K & ~int64_t(127);
  const __mmask64 all = ~__mmask64(0), tail = (__mmask64(1) << (K - K64)) - 1;  // K - K64 < 64
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const int8_t* w = q + (n + j) * K;
      __m512i lo0 = _mm512_setzero_si512(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
      for (int64_t k = 0; k < K128; k += 128) {
        vnni_step_at(w, xl, xh, k, all, lo0, hi0);
        vnni_step_at(w, xl, xh, k + 64, all, lo1, hi1);
      }
      if (K128 < K64) vnni_step_at(w, xl, xh, K128, all, lo0, hi0);
      if (K64 < K) vnni_step_at(w, xl, xh, K64, tail, lo1, hi1);
      lo[j] = _mm512_add_epi32(lo0, lo1);
      hi[j] = _mm512_add_epi32(hi0, hi1);
    }
    store4(lo, hi, r.sum, D + n);
  }
  if (n < n1) dots_portable(r, q, K, n, n1, D);
}

// x's 64-column steps held in registers where they fit (K <= 768: 12 steps of lo and hi take 24 of the 32), so
// the loop loads weights alone, a third of the loads of the loop above: loads, not memory, bound a matrix that
// comes from the cache, as a small model's do. Rows in address order, as above.
template <int NC>
LLMKIT_VNNI void dots_vnni_held(const QuantizedRow& r, const int8_t* q, int64_t K, int64_t n0, int64_t n1,
                                int64_t* D) {
  const int64_t K64 = K & ~int64_t(63);
  const __mmask64 all = ~__mmask64(0), tail = K > K64 ? (__mmask64(1) << (K - K64)) - 1 : all;
  __m512i xl[NC], xh[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) {
    xl[c] = _mm512_maskz_loadu_epi8(c == NC - 1 ? tail : all, r.lo.data() + 64 * c);
    xh[c] = _mm512_maskz_loadu_epi8(c == NC - 1 ? tail : all, r.hi.data() + 64 * c);
  }
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512i lo[4], hi[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int8_t* w = q + (n + j) * K;
      __m512i sums[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                         _mm512_setzero_si512()};  // lo and hi of even steps, then of odd steps
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) {
        const int p = 2 * (c & 1);
        vnni_step(w + 64 * c, c == NC - 1 ? tail : all, xl[c], xh[c], sums[p], sums[p + 1]);
      }
      lo[j] = _mm512_add_epi32(sums[0], sums[2]);
      hi[j] = _mm512_add_epi32(sums[1], sums[3]);
    }
    store4(lo, hi, r.sum, D + n);
  }
  if (n < n1) dots_portable(r, q, K, n, n1, D);
}

// by the number of 64-column steps; no columns need no registers: the loop above makes the zero sums
using Dots = void (*)(const QuantizedRow&, const int8_t*, int64_t, int64_t, int64_t, int64_t*);
constexpr Dots DOTS_VNNI_HELD[] = {dots_vnni, dots_vnni_held<1>, dots_vnni_held<2>, dots_vnni_held<3>,
                                   dots_vnni_held<4>, dots_vnni_held<5>, dots_vnni_held<6>, dots_vnni_held<7>,
                                   dots_vnni_held<8>, dots_vnni_held<9>, dots_vnni_held<10>, dots_vnni_held<11>,
                                   dots_vnni_held<12>};
constexpr int64_t HELD_STEPS = std::size(DOTS_VNNI_HELD) - 1;

// LLMKIT_CPU_KERNEL=portable|avx2 picks a slower path on any CPU, for the tests (none: llmkit/cpu_kernels.py)
int level() {
  static const int chosen = [] {
    const char* want = std::getenv("LLMKIT_CPU_KERNEL");
    const std::string w = want ? want : "";
    const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vnni");
    if (w == "portable") return 0;
    if (w == "avx2" || !vnni) return __builtin_cpu_supports("avx2") ? 1 : 0;
    return 2;
  }();
  return chosen;
}
#endif

#ifdef LLMKIT_X86
// quantize_row_portable 16 values at a time, with the same bits: the same float products, rounded to nearest even
// as lrintf does. The scalar loops (a call to lrintf per value) took a quarter of a small matrix's product, on the
// calling thread alone.
LLMKIT_VNNI void quantize_row_avx512(const float* x, int64_t K, QuantizedRow& r) {
  const auto mask = [K](int64_t k) { return K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1); };
  __m512 amax = _mm512_setzero_ps();
  __mmask16 non_finite = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(mask(k), x + k);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    const __m512 d = _mm512_sub_ps(v, v);  // nan where v is inf or nan
    non_finite |= _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
  }
  const float a = _mm512_reduce_max_ps(amax);
  if (non_finite || a == 0) return zero_row(r, !non_finite);
  r.sum = 0;
  r.sx = a / QuantizedRow::LIMIT;
  const __m512 inv = _mm512_set1_ps(QuantizedRow::LIMIT / a);
  const __m512i limit = _mm512_set1_epi32(QuantizedRow::LIMIT), low = _mm512_set1_epi32(-QuantizedRow::LIMIT);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = mask(k);
    const __m512i v = _mm512_max_epi32(
        _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), inv)), limit), low);
    const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(128)), 8);
    _mm512_mask_cvtepi32_storeu_epi16(r.xq.data() + k, m, v);
    _mm512_mask_cvtepi32_storeu_epi8(r.hi.data() + k, m, h);
    _mm512_mask_cvtepi32_storeu_epi8(r.lo.data() + k, m, _mm512_sub_epi32(v, _mm512_slli_epi32(h, 8)));
    r.sum += _mm512_reduce_add_epi32(v);  // lanes past K hold 0
  }
}
#endif

// One buffer per thread, reused across calls: a decode step makes dozens of these for rows of a few hundred values
QuantizedRow& quantize_row(const float* x, int64_t K) {
  thread_local QuantizedRow r;
  r.xq.resize(K);
  r.lo.resize(K);
  r.hi.resize(K);
#ifdef LLMKIT_X86
  if (level() == 2) {
    quantize_row_avx512(x, K, r);
    return r;
  }
#endif
  quantize_row_portable(x, K, r);
  return r;
}

void dots(const QuantizedRow& r, const int8_t* q, int64_t K, int64_t n0, int64_t n1, int64_t* D) {
#ifdef LLMKIT_X86
  if (K < 65536) {
    const int64_t steps = (K + 63) / 64;
    if (level() == 2) {
      return steps <= HELD_STEPS ? DOTS_VNNI_HELD[steps](r, q, K, n0, n1, D) : dots_vnni(r, q, K, n0, n1, D);
    }
    if (level() == 1) return dots_avx2(r, q, K, n0, n1, D);
  }
#endif
  dots_portable(r, q, K, n0, n1, D);
}

at::Tensor int8_weight_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_weight_mm: x [M, K] and q [N, K], got ",
              x.sizes(), " and ", q.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_weight_mm takes float32 x, int8 q and float32 scale");
  TORCH_CHECK(scale.numel() == q.size(0), "int8_weight_mm: one scale per row of q");
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous().view(-1);
  const int64_t M = x.size(0), N = q.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = xc.const_data_ptr<float>(), *sp = sc.const_data_ptr<float>();
  const int8_t* qp = qc.const_data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  // reused, as the quantized row is, and never shrunk: growing it back zeroes the new part (the output matrix's
  // 32000 rows after a 288-row one, every step)
  thread_local std::vector<int64_t> sums;
  if (sums.size() < static_cast<size_t>(N)) sums.resize(N);
  int64_t* D = sums.data();  // the workers' own thread_local copies are not this one
  // about 32 KB of weights per task, in whole blocks of 4 rows: a thread's share of a small matrix is not worth
  // waking another for
  const int64_t grain = std::max<int64_t>(4, (32768 / std::max<int64_t>(K, 1)) & ~int64_t(3));
  for (int64_t m = 0; m < M; ++m) {
    const QuantizedRow& r = quantize_row(xp + m * K, K);
    const double sx = r.sx;
    float* om = op + m * N;
    at::parallel_for(0, (N + 3) / 4, (grain + 3) / 4, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4);
      dots(r, qp, K, n0, n1, D);
      for (int64_t n = n0; n < n1; ++n) om[n] = static_cast<float>(static_cast<double>(D[n]) * sx * sp[n]);
    });
  }
  return out;
}

at::Tensor int8_weight_mm_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  return at::empty({x.size(0), q.size(0)}, x.options());
}

// float32 y = x w^T, four rows of w at a time, each with two running sums (a chain of dependent adds half as
// long), the four added across lanes together. Inductor's loop for a one-row product sums one row at a time with
// one running sum and adds across lanes after each; ATen's calls a matrix-matrix product (chapter 8 times each).
void float_rows_portable(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += x[k] * w[n * K + k];
    y[n] = sum;
  }
}

#ifdef LLMKIT_X86
#define LLMKIT_AVX512F __attribute__((target("avx512f,avx2,fma")))

LLMKIT_AVX512F inline __m256 half(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

LLMKIT_AVX512F void float_rows_avx512(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t K32 = K & ~int64_t(31);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m256 s[4];
    for (int j = 0; j < 4; ++j) {
      const float* r = w + (n + j) * K;
      __m512 a = _mm512_setzero_ps(), b = a;
      for (int64_t k = 0; k < K32; k += 32) {
        a = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a);
        b = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 16), _mm512_loadu_ps(x + k + 16), b);
      }
      for (int64_t k = K32; k < K; k += 16) {  // at most two steps, the last only over the columns that exist
        const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, r + k), _mm512_maskz_loadu_ps(m, x + k), a);
      }
      s[j] = half(_mm512_add_ps(a, b));
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    _mm_storeu_ps(y + n, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  float_rows_portable(x, w, K, n, n1, y);
}

__attribute__((target("avx2,fma"))) void float_rows_avx2(const float* x, const float* w, int64_t K, int64_t n0,
                                                         int64_t n1, float* y) {
  const int64_t K16 = K & ~int64_t(15);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m256 s[4];
    for (int j = 0; j < 4; ++j) {
      const float* r = w + (n + j) * K;
      __m256 a = _mm256_setzero_ps(), b = a;
      for (int64_t k = 0; k < K16; k += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(x + k + 8), b);
      }
      alignas(32) float rest[8] = {};
      for (int64_t k = K16; k < K; ++k) rest[k % 8] += r[k] * x[k];
      s[j] = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_load_ps(rest));
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    _mm_storeu_ps(y + n, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  float_rows_portable(x, w, K, n, n1, y);
}
#endif

void float_rows(const float* x, const float* w, int64_t K, int64_t n0, int64_t n1, float* y) {
#ifdef LLMKIT_X86
  if (level() == 2) return float_rows_avx512(x, w, K, n0, n1, y);
  if (level() == 1 && __builtin_cpu_supports("fma")) return float_rows_avx2(x, w, K, n0, n1, y);
#endif
  float_rows_portable(x, w, K, n0, n1, y);
}

at::Tensor float_weight_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "float_weight_mm: x [M, K] and w [N, K], got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float_weight_mm takes float32 x and w");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = xc.const_data_ptr<float>(), *wp = wc.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(4, (65536 / std::max<int64_t>(K, 1)) & ~int64_t(3));  // 256 KB a task
  for (int64_t m = 0; m < M; ++m) {
    at::parallel_for(0, (N + 3) / 4, grain / 4, [&](int64_t b0, int64_t b1) {
      float_rows(xp + m * K, wp, K, b0 * 4, std::min(N, b1 * 4), op + m * N);
    });
  }
  return out;
}

at::Tensor float_weight_mm_meta(const at::Tensor& x, const at::Tensor& w) {
  return at::empty({x.size(0), w.size(0)}, x.options());
}

// float32 y = x w^T with w packed in blocks of 16 rows, each block [K, 16]: column k's 16 weights side by side
// (llmkit.cpu_kernels.PackedLinear packs them). A block's 16 sums are one vector: x[k] broadcast times 16 weights,
// no sum across lanes, and the weights are one stream read in order, as XNNPACK holds them: on the AVX-512 VM a
// stories15M float32 AOTI step ran 1.04-1.12x as fast so at one thread as by float_rows' rows, 1.00-1.04x at two.
void packed_block_portable(const float* x, int64_t M, int64_t K, const float* p, int64_t width, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    float sum[16] = {};
    for (int64_t k = 0; k < K; ++k) {
      for (int j = 0; j < 16; ++j) sum[j] += x[m * K + k] * p[k * 16 + j];
    }
    std::copy(sum, sum + width, y + m * ldy);
  }
}

#ifdef LLMKIT_X86
// rows of x four at a time share each load of the block's weights; one row keeps four running sums over k
LLMKIT_AVX512F void packed_block_avx512(const float* x, int64_t M, int64_t K, const float* p, int64_t width, float* y,
                                        int64_t ldy) {
  const __mmask16 keep = width >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const float* r = x + m * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; ++k) {
      const __m512 w = _mm512_loadu_ps(p + k * 16);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(r[k]), w, a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(r[K + k]), w, a1);
      a2 = _mm512_fmadd_ps(_mm512_set1_ps(r[2 * K + k]), w, a2);
      a3 = _mm512_fmadd_ps(_mm512_set1_ps(r[3 * K + k]), w, a3);
    }
    _mm512_mask_storeu_ps(y + m * ldy, keep, a0);
    _mm512_mask_storeu_ps(y + (m + 1) * ldy, keep, a1);
    _mm512_mask_storeu_ps(y + (m + 2) * ldy, keep, a2);
    _mm512_mask_storeu_ps(y + (m + 3) * ldy, keep, a3);
  }
  for (; m < M; ++m) {
    const float* r = x + m * K;
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      a = _mm512_fmadd_ps(_mm512_set1_ps(r[k]), _mm512_loadu_ps(p + k * 16), a);
      b = _mm512_fmadd_ps(_mm512_set1_ps(r[k + 1]), _mm512_loadu_ps(p + k * 16 + 16), b);
      c = _mm512_fmadd_ps(_mm512_set1_ps(r[k + 2]), _mm512_loadu_ps(p + k * 16 + 32), c);
      d = _mm512_fmadd_ps(_mm512_set1_ps(r[k + 3]), _mm512_loadu_ps(p + k * 16 + 48), d);
    }
    for (; k < K; ++k) a = _mm512_fmadd_ps(_mm512_set1_ps(r[k]), _mm512_loadu_ps(p + k * 16), a);
    _mm512_mask_storeu_ps(y + m * ldy, keep, _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  }
}

__attribute__((target("avx2,fma"))) void packed_block_avx2(const float* x, int64_t M, int64_t K, const float* p,
                                                           int64_t width, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * K;
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const __m256 x0 = _mm256_set1_ps(r[k]), x1 = _mm256_set1_ps(r[k + 1]);
      a = _mm256_fmadd_ps(x0, _mm256_loadu_ps(p + k * 16), a);
      b = _mm256_fmadd_ps(x0, _mm256_loadu_ps(p + k * 16 + 8), b);
      c = _mm256_fmadd_ps(x1, _mm256_loadu_ps(p + k * 16 + 16), c);
      d = _mm256_fmadd_ps(x1, _mm256_loadu_ps(p + k * 16 + 24), d);
    }
    for (; k < K; ++k) {
      a = _mm256_fmadd_ps(_mm256_set1_ps(r[k]), _mm256_loadu_ps(p + k * 16), a);
      b = _mm256_fmadd_ps(_mm256_set1_ps(r[k]), _mm256_loadu_ps(p + k * 16 + 8), b);
    }
    alignas(32) float sum[16];
    _mm256_store_ps(sum, _mm256_add_ps(a, c));
    _mm256_store_ps(sum + 8, _mm256_add_ps(b, d));
    std::copy(sum, sum + width, y + m * ldy);
  }
}
#endif

void packed_block(const float* x, int64_t M, int64_t K, const float* p, int64_t width, float* y, int64_t ldy) {
#ifdef LLMKIT_X86
  if (level() == 2) return packed_block_avx512(x, M, K, p, width, y, ldy);
  if (level() == 1 && __builtin_cpu_supports("fma")) return packed_block_avx2(x, M, K, p, width, y, ldy);
#endif
  packed_block_portable(x, M, K, p, width, y, ldy);
}

at::Tensor float_packed_mm(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == 16 && x.size(1) == packed.size(1) &&
              N > 16 * (packed.size(0) - 1) && N <= 16 * packed.size(0),
              "float_packed_mm: x [M, K] and packed [ceil(N / 16), K, 16], got ", x.sizes(), ", ", packed.sizes(),
              " and N = ", N);
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "float_packed_mm takes float32 x and packed weights");
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float *xp = xc.const_data_ptr<float>(), *pp = pc.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * 16, 1));  // ~256 KB of weights a task
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) packed_block(xp, M, K, pp + b * K * 16, std::min<int64_t>(16, N - b * 16), op + b * 16, N);
  });
  return out;
}

at::Tensor float_packed_mm_meta(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  return at::empty_symint({x.sym_size(0), c10::SymInt(N)}, x.options());
}

// ---- a few queries' attention -------------------------------------------------------------------------------
// softmax(q k^T / sqrt(D) + mask) v for R query rows per head (one token; or one token's G grouped heads, stacked
// as rows of their key head) over the caches' first S positions (S: the mask's width), and its log-sum-exp; the
// query heads of a key head read its keys and values from the cache in place. The scores are float_rows of the
// head's cached keys (rows of D floats); inductor's loop for the same step reduced across lanes at every position.

void exp_portable(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

void add_scaled_portable(float a, const float* x, float* y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

#ifdef LLMKIT_X86
// e^x in place: x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts), e^r by its Taylor polynomial to r^6 (relative
// error ~1e-7, float32's rounding), times 2^n by scalef; below -87 (and -inf, a masked position) it is 0
LLMKIT_AVX512F void exp_avx512(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 in = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(in, x + i);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), v);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    _mm512_mask_storeu_ps(x + i, in, _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, k)));
  }
}

LLMKIT_AVX512F void add_scaled_avx512(float a, const float* x, float* y, int64_t D) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 in = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    _mm512_mask_storeu_ps(y + d, in, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(in, x + d), _mm512_maskz_loadu_ps(in, y + d)));
  }
}
#endif

void exp_in_place(float* x, int64_t n) {
#ifdef LLMKIT_X86
  if (level() == 2) return exp_avx512(x, n);
#endif
  exp_portable(x, n);
}

void add_scaled(float a, const float* x, float* y, int64_t D) {
#ifdef LLMKIT_X86
  if (level() == 2) return add_scaled_avx512(a, x, y, D);
#endif
  add_scaled_portable(a, x, y, D);
}

// one query head against its key head's first S cached positions k, v [S, D]; scores is room for S floats
void attend_one(const float* q, const float* k, const float* v, const float* mask, int64_t S, int64_t D,
                float* scores, float* out, float* lse) {
  float_rows(q, k, D, 0, S, scores);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float top = -INFINITY;
  for (int64_t t = 0; t < S; ++t) {
    scores[t] = scores[t] * scale + mask[t];
    if (!(scores[t] <= top)) top = scores[t];  // a NaN score makes the maximum NaN, and so every output
  }
  for (int64_t t = 0; t < S; ++t) scores[t] -= top;
  exp_in_place(scores, S);
  float sum = 0;
  std::fill(out, out + D, 0.0f);
  for (int64_t t = 0; t < S; ++t) {
    sum += scores[t];
    add_scaled(scores[t], v + t * D, out, D);
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
  *lse = top + std::log(sum);
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && mask.dim() == 4,
              "decode_attention: q [B, H, R, D], caches [B, H_kv, S_max, D], mask [B, 1, R, S]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat && mask.scalar_type() == at::kFloat,
              "decode_attention takes float32 tensors");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), H_kv = k_cache.size(1), S = mask.size(3);
  const int64_t mask_rows = mask.size(2), mask_batch = mask.size(0);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && H % H_kv == 0 && S <= k_cache.size(2) &&
              (mask_batch == 1 || mask_batch == B) && mask.size(1) == 1 && (mask_rows == 1 || mask_rows == R),
              "decode_attention: shapes ", q.sizes(), ", ", k_cache.sizes(), " and ", mask.sizes(), " do not fit");
  // the caches as they are (no copy of the window) where each position's D floats are one row
  const auto rows = [](const at::Tensor& c) { return c.stride(3) == 1 && c.stride(2) == c.size(3) ? c : c.contiguous(); };
  const at::Tensor qc = q.contiguous(), mc = mask.contiguous(), kc = rows(k_cache), vc = rows(v_cache);
  at::Tensor out = at::empty({B, H, R, D}, q.options()), lse = at::empty({B, H, R}, q.options());
  const float *qp = qc.const_data_ptr<float>(), *kp = kc.const_data_ptr<float>(), *vp = vc.const_data_ptr<float>();
  const float* mp = mc.const_data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t G = H / H_kv, grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(G * R * S * D, 1));
  at::parallel_for(0, B * H_kv, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H_kv, j = i % H_kv;
      const float *k = kp + b * kc.stride(0) + j * kc.stride(1), *v = vp + b * vc.stride(0) + j * vc.stride(1);
      for (int64_t h = j * G; h < (j + 1) * G; ++h) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = (b * H + h) * R + r;
          const float* m = mp + ((mask_batch == 1 ? 0 : b) * mask_rows + (mask_rows == 1 ? 0 : r)) * S;
          attend_one(qp + row * D, k, v, m, S, D, scores.data(), op + row * D, lp + row);
        }
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> decode_attention_meta(const at::Tensor& q, const at::Tensor& k_cache,
                                                            const at::Tensor& v_cache, const at::Tensor& mask) {
  // symbolic sizes (a batch compiled for any number of rows) stay symbolic
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)}, q.options())};
}

}  // namespace

TORCH_LIBRARY(llmkit_cpu, m) {
  m.def("int8_weight_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("float_weight_mm(Tensor x, Tensor w) -> Tensor");
  m.def("float_packed_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmkit_cpu, CPU, m) {
  m.impl("int8_weight_mm", &int8_weight_mm);
  m.impl("float_weight_mm", &float_weight_mm);
  m.impl("float_packed_mm", &float_packed_mm);
  m.impl("decode_attention", &decode_attention);
}

TORCH_LIBRARY_IMPL(llmkit_cpu, Meta, m) {
  m.impl("int8_weight_mm", &int8_weight_mm_meta);
  m.impl("float_weight_mm", &float_weight_mm_meta);
  m.impl("float_packed_mm", &float_packed_mm_meta);
  m.impl("decode_attention", &decode_attention_meta);
}
