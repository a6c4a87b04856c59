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
#include <cmath>
#include <vector>

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


// ---- decode attention ------------------------------------------------------------------------
//
// One query row per sequence (a plain decode step) against that sequence's own KV cache, for
// every such sequence of a batched step in one call. SDPA, called once per sequence and layer,
// spends more time in dispatch and in its own blocking for a single row than reading the keys
// and values; here each (sequence, KV head, block of KB keys) is one work item that reads its
// keys and values once for all the query heads of the group (GQA), in fp32, with a max-subtracted
// softmax. The blocks are merged in key order afterwards (flash-decoding), so a sequence's
// result depends only on its own cache: the same in any batch (batch invariant), like the
// matmul above.

constexpr int64_t KB = 256;    // keys per work item
constexpr int kMaxGroup = 16;  // query heads per KV head handled

// e^x for x <= 0 as 2^n 2^f (n = round(x log2 e), |f| <= 0.5), 2^f by a degree-6 polynomial:
// relative error below 4e-6 (enough for softmax weights); x below -87 gives ~1.6e-38, and a NaN
// stays NaN (max_ps returns its second operand when either is NaN). One set of constants for the
// AVX-512 and AVX2 forms below.
constexpr float kExpFloor = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Poly[] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                               5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f,
                               1.0f};  // highest power first (Horner)

#if defined(__AVX512F__)
inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(kExpFloor), x);
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(kLog2e));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
inline void exp_shifted(float* v, int64_t n, float shift) {  // v[i] = e^(v[i] - shift), v[i] <= shift
  int64_t i = 0;
  const __m512 s = _mm512_set1_ps(shift);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(v + i), s)));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(v + i, m, exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + i), s)));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// the same on 8 lanes (on AVX2 machines std::exp per score cost about as much as the rest of a block)
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(kExpFloor), x);
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline void exp_shifted(float* v, int64_t n, float shift) {  // v[i] = e^(v[i] - shift), v[i] <= shift
  int64_t i = 0;
  const __m256 s = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(v + i), s)));
  for (; i < n; ++i) v[i] = std::exp(v[i] - shift);  // the tail: at most 7 scores
}
#else
inline void exp_shifted(float* v, int64_t n, float shift) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i] - shift);
}
#endif

struct Partial {  // one work item's result for one query head
  float m, l;     // the block's max score and sum of e^(score - m)
};

// Scores, softmax weights and the weighted sum of values for keys [lo, hi) of one KV head.
// q: G rows of D (already scaled); k, v: row r at k + r * D; o: G rows of D; parts: G.
void attend_block(const float* q, int G, int64_t D, const float* k, const float* v, int64_t lo, int64_t hi, float* o,
                  Partial* parts) {
  float scores[kMaxGroup][KB];
  const int64_t n = hi - lo;
  for (int64_t r = 0; r < n; ++r) {
    const float* kr = k + (lo + r) * D;
    for (int h = 0; h < G; ++h) {
      const float* qh = q + h * D;
      typename Vec::T acc = Vec::zero();
      int64_t d = 0;
      for (; d + Vec::width <= D; d += Vec::width) acc = Vec::fma(Vec::load(qh + d), Vec::load(kr + d), acc);
      float sc = Vec::sum(acc);
      for (; d < D; ++d) sc += qh[d] * kr[d];
      scores[h][r] = sc;
    }
  }
  for (int h = 0; h < G; ++h) {
    float m = scores[h][0];
    for (int64_t r = 1; r < n; ++r) m = (scores[h][r] > m || std::isnan(scores[h][r])) ? scores[h][r] : m;  // NaN sticks
    exp_shifted(scores[h], n, m);
    float l = 0.0f;
    for (int64_t r = 0; r < n; ++r) l += scores[h][r];
    parts[h] = {m, l};
    std::fill(o + h * D, o + (h + 1) * D, 0.0f);
  }
  for (int64_t r = 0; r < n; ++r) {
    const float* vr = v + (lo + r) * D;
    int64_t d = 0;
    for (; d + Vec::width <= D; d += Vec::width) {
      const typename Vec::T vv = Vec::load(vr + d);
      for (int h = 0; h < G; ++h) {
        float* oh = o + h * D + d;
#if defined(__AVX512F__)
        _mm512_storeu_ps(oh, _mm512_fmadd_ps(_mm512_set1_ps(scores[h][r]), vv, _mm512_loadu_ps(oh)));
#elif defined(__AVX2__) && defined(__FMA__)
        _mm256_storeu_ps(oh, _mm256_fmadd_ps(_mm256_set1_ps(scores[h][r]), vv, _mm256_loadu_ps(oh)));
#else
        *oh += scores[h][r] * vv;
#endif
      }
    }
    for (; d < D; ++d)
      for (int h = 0; h < G; ++h) o[h * D + d] += scores[h][r] * vr[d];
  }
}

// query [N, Hq, D]; keys[b], values[b]: [1, Hkv, S_b, D] (rows contiguous, any head stride).
// Returns [N, Hq, D]: softmax(scale * q k^T) v per sequence and query head, query head h reading
// KV head h / (Hq / Hkv).
torch::Tensor decode_attention(const torch::Tensor& query, const std::vector<torch::Tensor>& keys,
                               const std::vector<torch::Tensor>& values, double scale) {
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == torch::kFloat32 && query.dim() == 3,
              "decode_attention: query must be fp32 [N, Hq, D] on the CPU");
  const int64_t N = query.size(0), Hq = query.size(1), D = query.size(2);
  TORCH_CHECK((int64_t)keys.size() == N && (int64_t)values.size() == N, "decode_attention: one cache per query row");
  TORCH_CHECK(N > 0 && D > 0, "decode_attention: empty query");
  const int64_t Hkv = keys[0].size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, "decode_attention: unsupported head grouping");
  const int G = (int)(Hq / Hkv);
  std::vector<const float*> kp(N), vp(N);
  std::vector<int64_t> ks(N), vs(N), len(N), first(N + 1, 0);
  for (int64_t b = 0; b < N; ++b) {
    const auto& k = keys[b];
    const auto& v = values[b];
    TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 && k.dim() == 4 && v.dim() == 4,
                "decode_attention: keys and values must be fp32 [1, Hkv, S, D]");
    TORCH_CHECK(k.size(0) == 1 && k.size(1) == Hkv && k.size(3) == D && v.sizes() == k.sizes(),
                "decode_attention: cache shapes do not match the query");
    TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D,
                "decode_attention: cache rows must be contiguous");
    TORCH_CHECK(k.size(2) > 0, "decode_attention: an empty cache");
    kp[b] = k.data_ptr<float>();
    vp[b] = v.data_ptr<float>();
    ks[b] = k.stride(1);
    vs[b] = v.stride(1);
    len[b] = k.size(2);
    first[b + 1] = first[b] + Hkv * ((len[b] + KB - 1) / KB);  // items of sequence b: (head, block)
  }
  auto q = (query.contiguous() * scale).contiguous();
  const float* qp = q.data_ptr<float>();
  const int64_t items = first[N];
  std::vector<float> o(items * G * D);
  std::vector<Partial> parts(items * G);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    int64_t b = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (it >= first[b + 1]) ++b;
      const int64_t blocks = (len[b] + KB - 1) / KB;
      const int64_t g = (it - first[b]) / blocks, j = (it - first[b]) % blocks;
      attend_block(qp + (b * Hq + g * G) * D, G, D, kp[b] + g * ks[b], vp[b] + g * vs[b], j * KB,
                   std::min(len[b], (j + 1) * KB), o.data() + it * G * D, parts.data() + it * G);
    }
  });
  auto out = torch::empty({N, Hq, D}, query.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / Hkv, g = bg % Hkv;
      const int64_t blocks = (len[b] + KB - 1) / KB, base = first[b] + g * blocks;
      for (int h = 0; h < G; ++h) {
        float m = parts[base * G + h].m;
        for (int64_t j = 1; j < blocks; ++j) m = std::max(m, parts[(base + j) * G + h].m);
        float* dst = op + (b * Hq + g * G + h) * D;
        std::fill(dst, dst + D, 0.0f);
        float l = 0.0f;
        for (int64_t j = 0; j < blocks; ++j) {  // in key order: the same sums in any batch
          const Partial& p = parts[(base + j) * G + h];
          const float w = std::exp(p.m - m);
          l += w * p.l;
          const float* src = o.data() + ((base + j) * G + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      }
    }
  });
  return out;
}


// Append one new row per sequence to its KV buffers: row rows[b] of key_states / value_states
// [1, H, T, D] goes to bufs[b][0, :, at[b], :] (buffers [1, H, capacity, D], rows contiguous).
// The one-row parts of a step (plain decode steps) append for all their sequences in one call
// instead of a few tensor ops per sequence and layer; the caller has made room and moves each
// layer's length on.
void append_rows(const torch::Tensor& key_states, const torch::Tensor& value_states,
                 const std::vector<torch::Tensor>& kbufs, const std::vector<torch::Tensor>& vbufs,
                 const std::vector<int64_t>& at, const std::vector<int64_t>& rows) {
  const int64_t N = (int64_t)at.size();
  TORCH_CHECK(key_states.dim() == 4 && key_states.size(0) == 1 && value_states.sizes() == key_states.sizes(),
              "append_rows: new rows must be [1, H, T, D]");
  TORCH_CHECK((int64_t)rows.size() == N, "append_rows: one source row per buffer");
  for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < key_states.size(2), "append_rows: no source row ", r);
  TORCH_CHECK(key_states.scalar_type() == torch::kFloat32 && value_states.scalar_type() == torch::kFloat32 &&
                  key_states.stride(3) == 1 && value_states.stride(3) == 1,
              "append_rows: fp32 rows with contiguous features");
  TORCH_CHECK((int64_t)kbufs.size() == N && (int64_t)vbufs.size() == N, "append_rows: one buffer per row");
  const int64_t H = key_states.size(1), D = key_states.size(3);
  for (int64_t b = 0; b < N; ++b) {
    for (const auto* buf : {&kbufs[b], &vbufs[b]}) {
      TORCH_CHECK(buf->scalar_type() == torch::kFloat32 && buf->dim() == 4 && buf->size(0) == 1 && buf->size(1) == H &&
                      buf->size(3) == D && buf->stride(3) == 1 && buf->stride(2) == D,
                  "append_rows: a buffer does not match the rows");
      TORCH_CHECK(at[b] >= 0 && at[b] < buf->size(2), "append_rows: no room at row ", at[b]);
    }
  }
  const float* kp = key_states.data_ptr<float>();
  const float* vp = value_states.data_ptr<float>();
  for (int64_t b = 0; b < N; ++b) {
    float* kd = kbufs[b].data_ptr<float>();
    float* vd = vbufs[b].data_ptr<float>();
    for (int64_t h = 0; h < H; ++h) {
      std::copy_n(kp + h * key_states.stride(1) + rows[b] * key_states.stride(2), D,
                  kd + h * kbufs[b].stride(1) + at[b] * D);
      std::copy_n(vp + h * value_states.stride(1) + rows[b] * value_states.stride(2), D,
                  vd + h * vbufs[b].stride(1) + at[b] * D);
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released: the kernel touches no Python object, and the server's other threads run meanwhile
  m.def("stream_linear", &stream_linear, "y = x @ weight.T (+ bias) for few rows, fp32 CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention", &decode_attention,
        "softmax(scale q k^T) v for one query row per sequence against its own cache, fp32 CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("append_rows", &append_rows, "one new KV row per sequence into its buffers, fp32 CPU",
        py::call_guard<py::gil_scoped_release>());
  m.attr("vector_width") = Vec::width;
}
