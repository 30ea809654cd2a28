// llmkit's one-row int8 weight-only product on the CPU: y = x (q * scale[:, None])^T, as a PyTorch custom op.
//
// torch.ops.llmkit_cpu.int8_weight_mm(x [M, K] float32, q [N, K] int8, scale [N] float32) -> [M, N] float32,
// the signature and result of ATen's _weight_int8pack_mm. At one row a product of K weights is a chain of
// multiply-adds: written with one accumulator per output row (inductor's loop) each add waits for the last
// (4 cycles here), so a row of 8 weights takes that long. This kernel multiplies 4 rows at a time with 2
// accumulators each: 8 independent chains. Where the weights come from memory rather than the L2 cache,
// reading them is the limit and the two run at about the same speed (benchmarks/cpu_gemv_bench.py). AVX2 where the CPU has it
// (chosen at run time), else a portable loop with the same 8 sums.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMKIT_X86 1
#endif

namespace {

// out[n] = sum_k x[k] q[n, k] for rows n0 <= n < n1
void int8_rows_portable(const float* x, const int8_t* q, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * K;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent sums, as the AVX2 kernel keeps
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      for (int j = 0; j < 8; ++j) acc[j] += x[k + j] * static_cast<float>(w[k + j]);
    }
    float sum = 0;
    for (; k < K; ++k) sum += x[k] * static_cast<float>(w[k]);
    for (int j = 0; j < 8; ++j) sum += acc[j];
    out[n] = sum;
  }
}

#ifdef LLMKIT_X86
__attribute__((target("avx2,fma"))) inline __m256 widen8(const int8_t* p) {
  // 8 int8 weights -> 8 floats: one sign-extending load, one conversion
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,fma"))) void int8_rows_avx2(const float* x, const int8_t* q, int64_t K, int64_t n0,
                                                         int64_t n1, float* out) {
  const int64_t K16 = K & ~int64_t(15), K8 = K & ~int64_t(7);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w0 = q + n * K;
    const int8_t *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
      a0 = _mm256_fmadd_ps(xa, widen8(w0 + k), a0);
      a1 = _mm256_fmadd_ps(xa, widen8(w1 + k), a1);
      a2 = _mm256_fmadd_ps(xa, widen8(w2 + k), a2);
      a3 = _mm256_fmadd_ps(xa, widen8(w3 + k), a3);
      b0 = _mm256_fmadd_ps(xb, widen8(w0 + k + 8), b0);
      b1 = _mm256_fmadd_ps(xb, widen8(w1 + k + 8), b1);
      b2 = _mm256_fmadd_ps(xb, widen8(w2 + k + 8), b2);
      b3 = _mm256_fmadd_ps(xb, widen8(w3 + k + 8), b3);
    }
    for (; k < K8; k += 8) {
      const __m256 xa = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(xa, widen8(w0 + k), a0);
      a1 = _mm256_fmadd_ps(xa, widen8(w1 + k), a1);
      a2 = _mm256_fmadd_ps(xa, widen8(w2 + k), a2);
      a3 = _mm256_fmadd_ps(xa, widen8(w3 + k), a3);
    }
    float s0 = hsum(_mm256_add_ps(a0, b0)), s1 = hsum(_mm256_add_ps(a1, b1));
    float s2 = hsum(_mm256_add_ps(a2, b2)), s3 = hsum(_mm256_add_ps(a3, b3));
    for (; k < K; ++k) {
      s0 += x[k] * w0[k];
      s1 += x[k] * w1[k];
      s2 += x[k] * w2[k];
      s3 += x[k] * w3[k];
    }
    out[n] = s0;
    out[n + 1] = s1;
    out[n + 2] = s2;
    out[n + 3] = s3;
  }
  if (n < n1) int8_rows_portable(x, q, K, n, n1, out);
}

// LLMKIT_CPU_PORTABLE=1 runs the portable loop on any CPU, for the tests
bool use_avx2() {
  static const bool yes =
      std::getenv("LLMKIT_CPU_PORTABLE") == nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

void int8_rows(const float* x, const int8_t* q, int64_t K, int64_t n0, int64_t n1, float* out) {
#ifdef LLMKIT_X86
  if (use_avx2()) return int8_rows_avx2(x, q, K, n0, n1, out);
#endif
  int8_rows_portable(x, q, K, n0, n1, out);
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
  // about 16 KB of weights per task, in whole blocks of 4 rows: a thread's share of a small matrix is not worth
  // waking another for
  const int64_t grain = std::max<int64_t>(4, (16384 / std::max<int64_t>(K, 1)) & ~int64_t(3));
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xp + m * K;
    float* om = op + m * N;
    at::parallel_for(0, (N + 3) / 4, (grain + 3) / 4, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4);
      int8_rows(xm, qp, K, n0, n1, om);
      for (int64_t n = n0; n < n1; ++n) om[n] *= sp[n];
    });
  }
  return out;
}

at::Tensor int8_weight_mm_meta(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  return at::empty({x.size(0), q.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY(llmkit_cpu, m) {
  m.def("int8_weight_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmkit_cpu, CPU, m) {
  m.impl("int8_weight_mm", &int8_weight_mm);
}

TORCH_LIBRARY_IMPL(llmkit_cpu, Meta, m) {
  m.impl("int8_weight_mm", &int8_weight_mm_meta);
}
