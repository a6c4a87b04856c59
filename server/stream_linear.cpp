// y = x @ weight.T for a few rows of x (fp32, CPU), streaming the weight once.
//
// A decode step, a lookahead tree or a small batch multiplies every weight matrix by 2-32 rows.
// The step is bound by reading the weights from memory; the BLAS's general matrix multiply
// treats these shapes as a small GEMM and, on the CPUs measured (bench/linear_routes.py), costs
// 1.5-2.5 times the one-row kernel. Here each thread takes a slice of the output features and,
// a few weight rows at a time, multiplies them with every input row while they sit in
// registers and L1, prefetching the next rows: 2-16 rows cost little more than one.
//
// Every output element is the same sequence of operations whatever the number of rows: vector
// partial sums over k in order, then one fixed horizontal reduction. So a row's result does not
// depend on which other rows share the call (batch invariant); it differs from the BLAS's only
// in summation order.
//
// Built at run time with -march=native (server/matmul.py): AVX-512, else AVX2+FMA, else a
// plain loop.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static constexpr int width = 16;
  static constexpr int group = 8;  // rows per pass: 32 vector registers
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  static constexpr int width = 8;
  static constexpr int group = 4;  // 16 vector registers
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
struct Vec {
  using T = float;
  static constexpr int width = 1;
  static constexpr int group = 4;
  static T zero() { return 0.0f; }
  static T load(const float* p) { return *p; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static float sum(T v) { return v; }
};
#endif

// Output features handled together: as many as keep accumulators + loads within the registers.
template <int R>
constexpr int features_per_block() {
  return Vec::group == 8 ? (R <= 2 ? 8 : (R <= 4 ? 4 : 3)) : (R <= 2 ? 4 : 2);
}

// y[r, f0 + j] for r < R, j < F: weight rows w[j] (length K), input rows x[r] (stride ldx).
// `ahead`: how many weight floats follow w (the prefetch stays inside the weight).
template <int R, int F>
inline void dot_block(const float* x, int64_t ldx, const float* w, int64_t K, int64_t ahead, float* y, int64_t ldy, int64_t f0) {
  typename Vec::T acc[F][R];
  for (int j = 0; j < F; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = Vec::zero();
  // prefetch the next block's rows, which keeps the memory busy; the last block re-touches its own
  const float* next = 2 * F * K <= ahead ? w + F * K : w;
  int64_t k = 0;
  for (; k + Vec::width <= K; k += Vec::width) {
    typename Vec::T wv[F];
    for (int j = 0; j < F; ++j) {
      wv[j] = Vec::load(w + j * K + k);
      __builtin_prefetch(next + j * K + k);
    }
    for (int r = 0; r < R; ++r) {
      typename Vec::T xv = Vec::load(x + r * ldx + k);
      for (int j = 0; j < F; ++j) acc[j][r] = Vec::fma(wv[j], xv, acc[j][r]);
    }
  }
  for (int j = 0; j < F; ++j) {
    for (int r = 0; r < R; ++r) {
      float s = Vec::sum(acc[j][r]);
      for (int64_t t = k; t < K; ++t) s += w[j * K + t] * x[r * ldx + t];
      y[r * ldy + f0 + j] = s;
    }
  }
}

// A row group of n <= Vec::group rows against F weight rows at f.
template <int F>
void dot_group(int64_t n, const float* x, int64_t ldx, const float* w, int64_t K, int64_t ahead, float* y, int64_t ldy, int64_t f) {
  switch (n) {
    case 1: return dot_block<1, F>(x, ldx, w, K, ahead, y, ldy, f);
    case 2: return dot_block<2, F>(x, ldx, w, K, ahead, y, ldy, f);
    case 3: return dot_block<3, F>(x, ldx, w, K, ahead, y, ldy, f);
    case 4: return dot_block<4, F>(x, ldx, w, K, ahead, y, ldy, f);
#if defined(__AVX512F__)
    case 5: return dot_block<5, F>(x, ldx, w, K, ahead, y, ldy, f);
    case 6: return dot_block<6, F>(x, ldx, w, K, ahead, y, ldy, f);
    case 7: return dot_block<7, F>(x, ldx, w, K, ahead, y, ldy, f);
    case 8: return dot_block<8, F>(x, ldx, w, K, ahead, y, ldy, f);
#endif
    default: TORCH_CHECK(false, "stream_linear: bad row group ", n);
  }
}

// Output features [f0, f1) for all rows: F weight rows at a time, each multiplied with every
// row group while it is in L1, so the weights stream from memory once and the prefetch of the
// next rows runs under all the groups' arithmetic. G = the full group's size.
template <int G>
void features_pass(const float* x, int64_t rows, const float* w, int64_t K, float* y, int64_t N, int64_t f0, int64_t f1) {
  constexpr int F = features_per_block<G>();
  int64_t f = f0;
  for (; f + F <= f1; f += F)
    for (int64_t r = 0; r < rows; r += G)
      dot_group<F>(std::min<int64_t>(G, rows - r), x + r * K, K, w + f * K, K, (N - f) * K, y + r * N, N, f);
  for (; f < f1; ++f)
    for (int64_t r = 0; r < rows; r += G)
      dot_group<1>(std::min<int64_t>(G, rows - r), x + r * K, K, w + f * K, K, (N - f) * K, y + r * N, N, f);
}

using Pass = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);

Pass pass_for(int64_t rows) {
  switch (std::min<int64_t>(rows, Vec::group)) {
    case 1: return features_pass<1>;
    case 2: return features_pass<2>;
    case 3: return features_pass<3>;
    case 4: return features_pass<4>;
#if defined(__AVX512F__)
    case 5: return features_pass<5>;
    case 6: return features_pass<6>;
    case 7: return features_pass<7>;
    case 8: return features_pass<8>;
#endif
    default: TORCH_CHECK(false, "stream_linear: bad row count ", rows);
  }
}

constexpr int64_t kGrain = 64;  // output features per thread at least

torch::Tensor stream_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "stream_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "stream_linear: fp32 only");
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "stream_linear: shapes do not match");
  TORCH_CHECK(weight.size(1) > 0, "stream_linear: empty rows");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "stream_linear: bias must have one value per output feature");
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto w = weight.contiguous();
  const int64_t rows = x2.size(0), K = x2.size(1), N = w.size(0);
  auto y = torch::empty({rows, N}, x2.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (rows > 0 && N > 0) {
    const Pass pass = pass_for(rows);
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) { pass(xp, rows, wp, K, yp, N, begin, end); });
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.reshape(shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released: the kernel touches no Python object, and the server's other threads run meanwhile
  m.def("stream_linear", &stream_linear, "y = x @ weight.T (+ bias) for few rows, fp32 CPU",
        py::call_guard<py::gil_scoped_release>());
  m.attr("vector_width") = Vec::width;
}
