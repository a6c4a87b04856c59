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
  static T set1(float x) { return _mm512_set1_ps(x); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
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
  static T set1(float x) { return _mm256_set1_ps(x); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
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
  static T set1(float x) { return x; }
  static void store(float* p, T v) { *p = v; }
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


// ---- decode and tree attention --------------------------------------------------------------
//
// The query rows of a step's decode parts (one row: a plain decode step) and lookahead trees (the
// last token and its draft nodes), each against its own sequence's KV cache, for every such part
// of a batched step in one call. SDPA, called once per sequence and layer, spends more time in
// dispatch, mask building and its own blocking for a few rows than reading the keys and values;
// here each (part, KV head, block of KB keys) is one work item that reads its keys and values
// once for all the part's rows and the query heads of the group (GQA), in fp32, with a
// max-subtracted softmax. The blocks are merged in key order afterwards (flash-decoding), so a
// row's result depends only on its own cache: the same in any batch (batch invariant), like the
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

// q . k over D floats: one vector accumulator in order, then the fixed horizontal sum.
inline float dot(const float* q, const float* k, int64_t D) {
  typename Vec::T acc = Vec::zero();
  int64_t d = 0;
  for (; d + Vec::width <= D; d += Vec::width) acc = Vec::fma(Vec::load(q + d), Vec::load(k + d), acc);
  float s = Vec::sum(acc);
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// The lane sums of eight vectors, in one vector: out[j] = sum of a[j]'s lanes.
inline __m256 lane_sums(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

// out[j] = q . k[j] for 8 consecutive key rows (row j at k + j * D): eight independent
// accumulator chains where AVX2 allows (D a multiple of 8), else one dot per key. A key's score
// depends only on its place in its block, never on the query rows around it.
inline void dots8(const float* q, const float* k, int64_t D, float* out) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  if (D % 8 == 0) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * D + d), acc[j]);
    }
    _mm256_storeu_ps(out, lane_sums(acc));
    return;
  }
#endif
  for (int j = 0; j < 8; ++j) out[j] = dot(q, k + j * D, D);
}

// o (+)= sum over n key rows in order of s[r] * v[r] (row r at v + r * D), D floats; `add`:
// continue the sums already in o (the same chain as one call over all the rows).
inline void weighted_values(const float* s, const float* v, int64_t n, int64_t D, float* o, bool add) {
  constexpr int W = Vec::width;
  int64_t d = 0;
  for (; d + 4 * W <= D; d += 4 * W) {
    typename Vec::T a0 = add ? Vec::load(o + d) : Vec::zero(), a1 = add ? Vec::load(o + d + W) : Vec::zero(),
                    a2 = add ? Vec::load(o + d + 2 * W) : Vec::zero(), a3 = add ? Vec::load(o + d + 3 * W) : Vec::zero();
    for (int64_t r = 0; r < n; ++r) {
      const typename Vec::T w = Vec::set1(s[r]);
      const float* vr = v + r * D + d;
      a0 = Vec::fma(w, Vec::load(vr), a0);
      a1 = Vec::fma(w, Vec::load(vr + W), a1);
      a2 = Vec::fma(w, Vec::load(vr + 2 * W), a2);
      a3 = Vec::fma(w, Vec::load(vr + 3 * W), a3);
    }
    Vec::store(o + d, a0);
    Vec::store(o + d + W, a1);
    Vec::store(o + d + 2 * W, a2);
    Vec::store(o + d + 3 * W, a3);
  }
  for (; d + W <= D; d += W) {
    typename Vec::T a = add ? Vec::load(o + d) : Vec::zero();
    for (int64_t r = 0; r < n; ++r) a = Vec::fma(Vec::set1(s[r]), Vec::load(v + r * D + d), a);
    Vec::store(o + d, a);
  }
  for (; d < D; ++d) {
    float a = add ? o[d] : 0.0f;
    for (int64_t r = 0; r < n; ++r) a += s[r] * v[r * D + d];
    o[d] = a;
  }
}

// The largest of n scores, and their sum (vector lanes, then the fixed horizontal sum).
inline float max_of(const float* x, int64_t n) {
  int64_t r = 0;
  float m = -INFINITY;
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(x);
    for (r = 8; r + 8 <= n; r += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + r));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
#endif
  for (; r < n; ++r) m = std::max(m, x[r]);
  return m;
}
inline float sum_of(const float* x, int64_t n) {
  typename Vec::T acc = Vec::zero();
  int64_t r = 0;
  for (; r + Vec::width <= n; r += Vec::width) acc = Vec::fma(Vec::set1(1.0f), Vec::load(x + r), acc);
  float l = Vec::sum(acc);
  for (; r < n; ++r) l += x[r];
  return l;
}

constexpr int64_t KC = 32;  // keys per pass over the query vectors (their values stay in L1)

// Query rows that share one cache: a sequence's part of a step. Cache [1, Hkv, len, D] (rows
// contiguous, any head stride); every row sees the first `prefix` cache rows, and of the part's
// new rows (the rest) those `visible` marks (null: all).
struct Group {
  const float* k;
  const float* v;
  int64_t k_head, v_head;  // head strides
  int64_t len, prefix;
  int64_t first, rows;   // its query rows: first .. first + rows - 1
  const bool* visible;   // [rows, vis_stride]
  int64_t vis_stride;
};

// Scores, softmax weights and the weighted sum of values for keys [lo, hi) of one KV head, for
// the group's rows x the G query heads on that KV head (Q = rows * G query vectors, row-major).
// q: the group's first query row at this KV head's first query head (row i, head h at
// q + i * q_row + h * D, already scaled); o: Q rows of D; parts: Q; scores: Q * KB floats.
void attend_block(const Group& grp, const float* q, int64_t q_row, int G, int64_t D, const float* k, const float* v,
                  int64_t lo, int64_t hi, float* o, Partial* parts, float* scores) {
  const int64_t n = hi - lo;
  const int64_t Q = grp.rows * G;
  auto qvec = [&](int64_t qi) { return q + (qi / G) * q_row + (qi % G) * D; };
  // scores, eight keys at a time for every query vector (the eight keys stay in L1)
  int64_t r0 = 0;
  for (; r0 + 8 <= n; r0 += 8)
    for (int64_t qi = 0; qi < Q; ++qi) dots8(qvec(qi), k + (lo + r0) * D, D, scores + qi * KB + r0);
  for (int64_t qi = 0; qi < Q; ++qi)
    for (int64_t r = r0; r < n; ++r) scores[qi * KB + r] = dot(qvec(qi), k + (lo + r) * D, D);
  const bool masked = grp.visible != nullptr && hi > grp.prefix;
  const int64_t from = std::max(lo, grp.prefix) - lo;  // the block's first new row
  for (int64_t qi = 0; qi < Q; ++qi) {
    float* sc = scores + qi * KB;
    // which of the block's new rows (from `from` on) this query row sees: sees[r - from]
    const bool* sees = masked ? grp.visible + (qi / G) * grp.vis_stride + (lo + from - grp.prefix) : nullptr;
    if (masked)
      for (int64_t r = from; r < n; ++r)
        if (!sees[r - from]) sc[r] = -INFINITY;
    const float m = max_of(sc, n);  // a NaN score need not win: e^(NaN - m) is NaN, and so is l
    if (m == -INFINITY) {  // the row sees none of these keys
      parts[qi] = {m, 0.0f};
      std::fill(sc, sc + n, 0.0f);
      continue;
    }
    exp_shifted(sc, n, m);
    if (masked)
      for (int64_t r = from; r < n; ++r)
        if (!sees[r - from]) sc[r] = 0.0f;
    parts[qi] = {m, sum_of(sc, n)};
  }
  // the weighted values, KC keys at a time for every query vector
  for (int64_t c = 0; c < n; c += KC)
    for (int64_t qi = 0; qi < Q; ++qi)
      weighted_values(scores + qi * KB + c, v + (lo + c) * D, std::min(KC, n - c), D, o + qi * D, c > 0);
}

// query [N, Hq, D] (already scaled, contiguous) over the groups (which cover its rows in order);
// returns [N, Hq, D]. Each (group, KV head, block of KB keys) is one work item that reads its keys
// and values once for all the group's rows and query heads; blocks are merged in key order
// afterwards (flash-decoding). A row's result depends only on its own group's cache and its
// visible rows, never on the other groups: the same in any batch, and a one-row group that sees
// its whole cache is exactly a decode row.
torch::Tensor attend_groups(const torch::Tensor& q, const std::vector<Group>& groups, int64_t Hkv) {
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2);
  const int G = (int)(Hq / Hkv);
  const int64_t NG = (int64_t)groups.size();
  std::vector<int64_t> first(NG + 1, 0), row_group(N);
  std::vector<int64_t> at(1, 0);  // per item: where its Q query vectors' outputs start (in vectors)
  int64_t most = 1;
  for (int64_t gi = 0; gi < NG; ++gi) {
    const Group& g = groups[gi];
    const int64_t blocks = (g.len + KB - 1) / KB;
    first[gi + 1] = first[gi] + Hkv * blocks;
    for (int64_t it = 0; it < Hkv * blocks; ++it) at.push_back(at.back() + g.rows * G);
    for (int64_t i = 0; i < g.rows; ++i) row_group[g.first + i] = gi;
    most = std::max(most, g.rows * G);
  }
  const float* qp = q.data_ptr<float>();
  const int64_t items = first[NG];
  std::vector<float> o(at.back() * D);
  std::vector<Partial> parts(at.back());
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(most * KB);
    int64_t gi = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (it >= first[gi + 1]) ++gi;
      const Group& g = groups[gi];
      const int64_t blocks = (g.len + KB - 1) / KB;
      const int64_t h = (it - first[gi]) / blocks, j = (it - first[gi]) % blocks;
      attend_block(g, qp + (g.first * Hq + h * G) * D, Hq * D, G, D, g.k + h * g.k_head, g.v + h * g.v_head, j * KB,
                   std::min(g.len, (j + 1) * KB), o.data() + at[it] * D, parts.data() + at[it], scores.data());
    }
  });
  auto out = torch::empty({N, Hq, D}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / Hkv, kh = nh % Hkv;
      const int64_t gi = row_group[n];
      const Group& g = groups[gi];
      const int64_t blocks = (g.len + KB - 1) / KB, base = first[gi] + kh * blocks;
      for (int h = 0; h < G; ++h) {
        const int64_t qi = (n - g.first) * G + h;
        float m = parts[at[base] + qi].m;
        for (int64_t j = 1; j < blocks; ++j) m = std::max(m, parts[at[base + j] + qi].m);
        float* dst = op + (n * Hq + kh * G + h) * D;
        std::fill(dst, dst + D, 0.0f);
        float l = 0.0f;
        for (int64_t j = 0; j < blocks; ++j) {  // in key order: the same sums in any batch
          const Partial& p = parts[at[base + j] + qi];
          if (p.l == 0.0f) continue;  // a block the row sees nothing of
          const float w = std::exp(p.m - m);
          l += w * p.l;
          const float* src = o.data() + (at[base + j] + qi) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      }
    }
  });
  return out;
}

// The checks both entry points make on the caches; returns Hkv.
int64_t check_caches(const char* name, const torch::Tensor& query, const std::vector<torch::Tensor>& keys,
                     const std::vector<torch::Tensor>& values) {
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == torch::kFloat32 && query.dim() == 3, name,
              ": query must be fp32 [N, Hq, D] on the CPU");
  const int64_t Hq = query.size(1), D = query.size(2);
  TORCH_CHECK(query.size(0) > 0 && D > 0, name, ": empty query");
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(), name, ": one key and one value cache per sequence");
  const int64_t Hkv = keys[0].size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= kMaxGroup, name, ": unsupported head grouping");
  for (size_t b = 0; b < keys.size(); ++b) {
    const auto& k = keys[b];
    const auto& v = values[b];
    TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 && k.dim() == 4 && v.dim() == 4,
                name, ": keys and values must be fp32 [1, Hkv, S, D]");
    TORCH_CHECK(k.size(0) == 1 && k.size(1) == Hkv && k.size(3) == D && v.sizes() == k.sizes(), name,
                ": cache shapes do not match the query");
    TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D, name,
                ": cache rows must be contiguous");
    TORCH_CHECK(k.size(2) > 0, name, ": an empty cache");
  }
  return Hkv;
}

// One query row (row `first`) that sees the whole cache.
Group whole_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t first) {
  return {k.data_ptr<float>(), v.data_ptr<float>(), k.stride(1), v.stride(1), k.size(2), k.size(2), first, 1, nullptr, 0};
}

// query [N, Hq, D]; keys[b], values[b]: [1, Hkv, S_b, D] (rows contiguous, any head stride).
// Returns [N, Hq, D]: softmax(scale * q k^T) v per sequence and query head, query head h reading
// KV head h / (Hq / Hkv).
torch::Tensor decode_attention(const torch::Tensor& query, const std::vector<torch::Tensor>& keys,
                               const std::vector<torch::Tensor>& values, double scale) {
  const int64_t Hkv = check_caches("decode_attention", query, keys, values);
  TORCH_CHECK((int64_t)keys.size() == query.size(0), "decode_attention: one cache per query row");
  std::vector<Group> groups;
  for (size_t b = 0; b < keys.size(); ++b) groups.push_back(whole_cache(keys[b], values[b], (int64_t)b));
  return attend_groups((query.contiguous() * scale).contiguous(), groups, Hkv);
}

// ---- tree attention --------------------------------------------------------------------------
//
// The rows of several sequences' parts of a step (a decode row, or a lookahead tree: the last
// token and its draft nodes) against their own caches, in one call. Part p's T_p new rows are the
// last T_p rows of its cache (keys[p] [1, Hkv, S_p, D], written by this forward); query row n of
// part row_part[n] sees every cache row before them and the new rows j with visible[n][j] (its
// ancestors and itself). Its keys are read as the sequence plain decoding would have cached
// had the draft been accepted up to it, so a one-row part is exactly a decode_attention row.
// SDPA with a tree mask, called per sequence and layer, costs far more than the arithmetic for
// these few rows (mask building, dispatch, its blocking).
torch::Tensor tree_attention(const torch::Tensor& query, const std::vector<torch::Tensor>& keys,
                             const std::vector<torch::Tensor>& values, const torch::Tensor& row_part,
                             const torch::Tensor& visible, double scale) {
  const int64_t Hkv = check_caches("tree_attention", query, keys, values);
  const int64_t N = query.size(0), P = (int64_t)keys.size();
  TORCH_CHECK(row_part.scalar_type() == torch::kInt64 && row_part.dim() == 1 && row_part.size(0) == N,
              "tree_attention: row_part must be int64 [N]");
  TORCH_CHECK(visible.scalar_type() == torch::kBool && visible.dim() == 2 && visible.size(0) == N,
              "tree_attention: visible must be bool [N, T]");
  auto part = row_part.contiguous();
  auto vis = visible.contiguous();
  const int64_t* pp = part.data_ptr<int64_t>();
  const bool* vp = vis.data_ptr<bool>();
  const int64_t T = vis.size(1);
  std::vector<int64_t> rows_of(P, 0);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(pp[n] >= 0 && pp[n] < P, "tree_attention: row ", n, " names no part");
    TORCH_CHECK(n == 0 || pp[n] >= pp[n - 1], "tree_attention: rows must be grouped by part, in order");
    ++rows_of[pp[n]];
  }
  std::vector<Group> groups;
  for (int64_t n = 0; n < N; n += rows_of[pp[n]]) {
    const int64_t p = pp[n], t = rows_of[p];
    TORCH_CHECK(t <= T, "tree_attention: part ", p, " has more rows than visible has columns");
    TORCH_CHECK(t <= keys[p].size(2), "tree_attention: part ", p, " has more rows than its cache");
    for (int64_t i = 0; i < t; ++i) {
      const bool* row = vp + (n + i) * T;
      TORCH_CHECK(row[i], "tree_attention: row ", n + i, " must see itself");
      for (int64_t j = i + 1; j < T; ++j) TORCH_CHECK(!row[j], "tree_attention: row ", n + i, " sees a later row");
    }
    Group g = whole_cache(keys[p], values[p], n);
    g.prefix = g.len - t;
    g.rows = t;
    g.visible = vp + n * T;
    g.vis_stride = T;
    groups.push_back(g);
  }
  return attend_groups((query.contiguous() * scale).contiguous(), groups, Hkv);
}

// Append each sequence's new rows to its KV buffers: rows rows[b] .. rows[b] + counts[b] - 1 of
// key_states / value_states [1, H, T, D] go to bufs[b][0, :, at[b] .., :] (buffers [1, H,
// capacity, D], rows contiguous). The parts of a step (decode rows, lookahead trees) append for
// all their sequences in one call instead of a few tensor ops per sequence and layer; the caller
// has made room and moves each layer's length on.
void append_rows(const torch::Tensor& key_states, const torch::Tensor& value_states,
                 const std::vector<torch::Tensor>& kbufs, const std::vector<torch::Tensor>& vbufs,
                 const std::vector<int64_t>& at, const std::vector<int64_t>& rows, const std::vector<int64_t>& counts) {
  const int64_t N = (int64_t)at.size();
  TORCH_CHECK(key_states.dim() == 4 && key_states.size(0) == 1 && value_states.sizes() == key_states.sizes(),
              "append_rows: new rows must be [1, H, T, D]");
  TORCH_CHECK((int64_t)rows.size() == N && (int64_t)counts.size() == N, "append_rows: one source run per buffer");
  for (int64_t b = 0; b < N; ++b)
    TORCH_CHECK(counts[b] >= 1 && rows[b] >= 0 && rows[b] + counts[b] <= key_states.size(2), "append_rows: no source row ",
                rows[b] + counts[b] - 1);
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
      TORCH_CHECK(at[b] >= 0 && at[b] + counts[b] <= buf->size(2), "append_rows: no room at row ", at[b] + counts[b] - 1);
    }
  }
  const float* kp = key_states.data_ptr<float>();
  const float* vp = value_states.data_ptr<float>();
  for (int64_t b = 0; b < N; ++b) {
    float* kd = kbufs[b].data_ptr<float>();
    float* vd = vbufs[b].data_ptr<float>();
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r = 0; r < counts[b]; ++r) {
        std::copy_n(kp + h * key_states.stride(1) + (rows[b] + r) * key_states.stride(2), D,
                    kd + h * kbufs[b].stride(1) + (at[b] + r) * D);
        std::copy_n(vp + h * value_states.stride(1) + (rows[b] + r) * value_states.stride(2), D,
                    vd + h * vbufs[b].stride(1) + (at[b] + r) * D);
      }
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
  m.def("tree_attention", &tree_attention,
        "softmax(scale q k^T) v for decode rows and lookahead trees of several sequences, each against its own "
        "cache, fp32 CPU",
        py::call_guard<py::gil_scoped_release>());
  m.def("append_rows", &append_rows, "each sequence's new KV rows into its buffers, fp32 CPU",
        py::call_guard<py::gil_scoped_release>());
  m.attr("vector_width") = Vec::width;
}
