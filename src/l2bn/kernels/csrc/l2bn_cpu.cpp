// L2BN on the CPU: the whole layer in as many passes over memory as BatchNorm's own kernels make.
//
// x has shape (N, C, *S), M = |S|, D = C·M, laid out either as rows (n, c, m) -> (n·C + c)·M + m
// (contiguous) or channels-last (n, c, m) -> (n·M + m)·C + c. Notation and algebra: docs/algorithm.md.
//
//   forward (training)  per (n, c): shifted sums → mean m, Σ_S (x − m)²                  (one read of x)
//                       O(N·C) algebra in float64: r_n, μ_c, σ²_c (Chan et al.'s pooled variance)
//                       y = x·a[n,c] + b[c]                                                  (one read, one write)
//   forward (eval)      per sample: x·gain_c written while ‖x_n‖ is summed, then y·r_n + shift_c in place
//                       while the sample is in cache (small samples: ‖x_n‖, then the output)  (one read, one write)
//                       outputs of 24 MiB and more: ‖x_n‖, then y from x in cache
//   Outputs of passes touching 48 MiB and more (y of 24 MiB, dx of 16 MiB) are stored past the caches.
//   backward            per (n, c): m, Σ (x − m)², Σ dy, Σ dy·(x − m)                       (one read of x, dy)
//                       dx = dy·P[n,c] + x·Q[n,c] + R[n,c]                                  (one read each, one write)
//
// Only x and the weight are saved for backward (the running statistics too in evaluation mode): the
// per-(n, c) moments are recomputed from x during the read backward needs anyway.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 512;  // values summed in the accumulation type before a float64 add
constexpr int64_t kInCacheRun = 64;  // eval: (n, c) runs at least this long take eval_in_cache ...
constexpr int64_t kInCacheBytes = 32 * 1024;  // ... for samples of at least this size (smaller: L1-resident)
constexpr int64_t kStreamBytes = 48 << 20;  // passes touching this much (1.5× this L3) stream their output
constexpr int64_t kTwoRowBytes = 256 * 1024;  // channels-last samples up to this size: two rows per update ...
constexpr int64_t kLaneRowBytes = 512;        // ... and, with rows of at least this size, register lane groups
constexpr int64_t kLaneRowMaxBytes = 4096;    //     (below this size: each row on a page of its own is slower)
constexpr int64_t kTwoRowWideBytes = 512 * 1024;  // two rows per update up to this size for rows of 4 KiB or more

// ---------------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------------

struct Geometry {
  int64_t N, C, M;
  bool channels_last;
};

at::MemoryFormat channels_last_format(int64_t dim) {
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// A channels-last tensor that is not also plain contiguous (those take the row kernels).
bool is_channels_last(const Tensor& x) {
  if (x.dim() != 4 && x.dim() != 5) return false;
  return !x.is_contiguous() && x.is_contiguous(channels_last_format(x.dim()));
}

// x itself when it is contiguous or channels-last, otherwise a contiguous copy.
Tensor dense(const Tensor& x) {
  return is_channels_last(x) ? x : x.contiguous();
}

// t in the memory layout of the dense tensor x.
Tensor like(const Tensor& t, const Tensor& x) {
  return is_channels_last(x) ? t.contiguous(channels_last_format(x.dim())) : t.contiguous();
}

Geometry geometry(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t M = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  return {N, C, M, M == 1 || is_channels_last(x)};  // with M = 1 both layouts are the same (N, C) rows
}

// A per-channel parameter as float64 (``fill`` where absent), read directly: no tensor temporaries.
std::vector<double> to_vector(const std::optional<Tensor>& t, int64_t size, double fill) {
  std::vector<double> out(size, fill);
  if (!t.has_value() || !t->defined()) return out;
  const Tensor c = t->is_contiguous() ? *t : t->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "l2bn_to_vector", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < size; ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

// running ← (1 − momentum)·running + momentum·value, in place, as F.batch_norm updates its statistics.
void blend_into(Tensor& running, const std::vector<double>& value, double momentum) {
  Tensor target = running.is_contiguous() ? running : running.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "l2bn_blend", [&] {
    scalar_t* p = target.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < value.size(); ++i)
      p[i] = static_cast<scalar_t>((1.0 - momentum) * static_cast<double>(p[i]) + momentum * value[i]);
  });
  if (!target.is_same(running)) running.copy_(target);
}

// ---------------------------------------------------------------------------------------------------
// Element loads and stores in the accumulation type. bfloat16 goes through its bits (a shift each way,
// round-to-nearest-even on the way back, NaN kept NaN) with branch-free arithmetic that the compiler
// vectorises; c10::BFloat16's own conversions branch and keep every loop scalar (2.3–5.9× BatchNorm's time
// with them). The values are exactly torch's (tested on every bit pattern). float16's scalar load is the
// branch-free form below, which vectorises; its scalar store keeps c10's conversion (a branch-free store
// vectorised too, but cost more than it saved in short row tails: session 26); its vector forms below are F16C's
// (float16 took 7–10× BatchNorm's eval time and 3–5.7× its training time without them).
// ---------------------------------------------------------------------------------------------------

inline float float_of_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_of_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

template <typename T>
inline at::opmath_type<T> load(const T* p, int64_t i) {
  return static_cast<at::opmath_type<T>>(p[i]);
}

template <>
inline float load(const c10::BFloat16* p, int64_t i) {
  return float_of_bits(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}

// All-ones where ``condition`` holds, else zero: selections as bit masks keep the loops branch-free.
inline uint32_t mask_if(bool condition) {
  return 0u - static_cast<uint32_t>(condition);
}

// float16 → float32 in integer and float arithmetic that GCC vectorises, for loops that convert one value at a
// time (c10::Half's F16C conversion, one value an instruction, keeps such loops scalar; the hot ones widen with
// F16C instead: load_acc, staged rows): Maratos's FP16 library's method (github.com/Maratyszcza/FP16,
// fp16_ieee_to_fp32_value), which c10 uses without F16C — the exponent rebased by a multiply by 2^-112,
// subnormals through a magic subtraction, selected by a mask. Exact for every pattern (tested).
template <>
inline float load(const c10::Half* p, int64_t i) {
  const uint32_t w = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  const uint32_t sign = w & 0x80000000u, two_w = w + w;
  const float normal = float_of_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = float_of_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t small = mask_if(two_w < (1u << 27));
  return float_of_bits(sign | (small & bits_of_float(subnormal)) | (~small & bits_of_float(normal)));
}

template <typename T>
inline void store(T* p, int64_t i, at::opmath_type<T> value) {
  p[i] = static_cast<T>(value);
}

template <>
inline void store(c10::BFloat16* p, int64_t i, float value) {
  const uint32_t bits = bits_of_float(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = mask_if((bits & 0x7FFFFFFFu) > 0x7F800000u);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>((nan & 0x7FC0u) | (~nan & rounded));
}

// The build's vector register: 32 bytes with AVX2, else 16 (SSE, NEON). GCC keeps generic vectors wider than
// the target's registers in memory: built without AVX2, 32-byte ones sent every accumulator of a loop through
// the stack, and NCHW eval took up to 2× BatchNorm's time (3× its time with these; session 27).
#if defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// kVectorBytes of T (one register; GCC/Clang vector extensions), loaded and stored unaligned, and summed across
// its lanes in lane order.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof v); }
  static T lane_sum(type v) {
    T sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += v[l];
    return sum;
  }
};

// float16 in vector registers where the compiler has F16C (vcvtph2ps, vcvtps2ph: exact widening and IEEE
// round-to-nearest-even, the conversions c10::Half itself uses one value at a time with F16C).
#if defined(__AVX2__)
constexpr bool kAvx2 = true;
#else
constexpr bool kAvx2 = false;
#endif
#if defined(__AVX2__) && defined(__F16C__)
constexpr bool kHalfVectors = true;
#else
constexpr bool kHalfVectors = false;
#endif

// A vector of T's accumulation type from p, the vector form of load(): the values themselves (float, double), or
// bfloat16 values widened (their bits shifted up: exact), or eight float16 values (with F16C).
// kVectorLoads: the types it takes.
template <typename T>
inline typename Vec<T>::type load_acc(const T* p) {
  return Vec<T>::load(p);
}

inline Vec<float>::type load_acc(const c10::BFloat16* p) {
#if defined(__AVX2__)  // one vpmovzxwd from memory (GCC widens the generic form below in four steps)
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<Vec<float>::type>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
#else
  typedef uint16_t Halves __attribute__((vector_size(kVectorBytes / 2)));
  typedef uint32_t Words __attribute__((vector_size(kVectorBytes)));
  Halves bits;
  std::memcpy(&bits, p, sizeof bits);
  return reinterpret_cast<Vec<float>::type>(__builtin_convertvector(bits, Words) << 16);
#endif
}

#if defined(__AVX2__) && defined(__F16C__)
inline Vec<float>::type load_acc(const c10::Half* p) {
  return reinterpret_cast<Vec<float>::type>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// float16 with F16C: the sums' blocks of rows are widened into float32 first (ColumnSums::staged_rows,
// small_sums), since inside omp simd loops float16 widens only in the branch-free scalar form.
template <typename T>
constexpr bool kStaged16 = kHalfVectors && std::is_same_v<T, c10::Half>;

template <typename T>
constexpr bool kVectorLoads = std::is_same_v<T, at::opmath_type<T>> || std::is_same_v<T, c10::BFloat16> ||
                              (kHalfVectors && std::is_same_v<T, c10::Half>);

// The 16-bit types whose output passes go sixteen values a step (Wide16, below).
template <typename T>
constexpr bool kVector16 =
    (kAvx2 && std::is_same_v<T, c10::BFloat16>) || (kHalfVectors && std::is_same_v<T, c10::Half>);

#if defined(__AVX2__)
// Sixteen 16-bit values as two float32 vectors (widen16), and back (narrow16: store()'s rounding and NaN, eight
// lanes at a time). float16: values 0–7 and 8–15. bfloat16: unpacking leaves the values in the order (0–3,
// 8–11), (4–7, 12–15), which packing restores without a cross-lane step: for arithmetic that treats every value
// alike (one coefficient a run), or with coefficient rows in the same order (in_widen_order).
struct Wide16 {
  __m256 lo, hi;
};

// A coefficient row's whole blocks of sixteen values (of C) put in bfloat16's widen16 order, values 4–7 and 8–11
// swapped in place.
inline void in_widen_order(float* row, int64_t C) {
  for (int64_t c = 0; c + 16 <= C; c += 16) {
    const __m256 first = _mm256_loadu_ps(row + c), second = _mm256_loadu_ps(row + c + 8);
    _mm256_storeu_ps(row + c, _mm256_permute2f128_ps(first, second, 0x20));
    _mm256_storeu_ps(row + c + 8, _mm256_permute2f128_ps(first, second, 0x31));
  }
}

inline Wide16 widen16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), zero = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits)),
          _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits))};
}

// The bfloat16 bits of eight floats in the low halves of 32-bit lanes: (bits + 0x7FFF + lsb) >> 16, NaN 0x7FC0.
inline __m256i rounded_bf16(__m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i rounded = _mm256_srli_epi32(biased, 16);
  const __m256 nan = _mm256_cmp_ps(value, value, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

inline void narrow16(c10::BFloat16* p, Wide16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(rounded_bf16(v.lo), rounded_bf16(v.hi)));
}

// narrow16 of values 0–7 and 8–15 (load_acc's order), one cross-lane step more.
inline void narrow16_in_order(c10::BFloat16* p, __m256 first, __m256 second) {
  const __m256i packed = _mm256_packus_epi32(rounded_bf16(first), rounded_bf16(second));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
inline Wide16 widen16(const c10::Half* p) {
  return {load_acc(p), load_acc(p + 8)};
}

inline void narrow16(c10::Half* p, Wide16 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT));
}

inline void narrow16_in_order(c10::Half* p, __m256 first, __m256 second) {
  narrow16(p, {first, second});
}
#endif

// A row's whole blocks of sixteen 16-bit values: out[i..i+16) from f(i) and f(i + 8), the float32 vectors of
// outputs i..i+8 and i+8..i+16 (f takes its inputs with load_acc); returns how many values it wrote (none for
// other types: their scalar loops vectorise as they are).
template <typename T, typename F>
int64_t blocks16_in_order(T* __restrict__ out, int64_t len, const F& f) {
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (kVector16<T>) {
    for (; i + 16 <= len; i += 16) narrow16_in_order(out + i, f(i), f(i + 8));
  }
#endif
  return i;
}

// A row's whole blocks of sixteen 16-bit values in widen16's order: out[i..i+16) from f(x, y, j) for the two
// float32 vectors x of u[i..i+16) and y of v[i..i+16) (kTwoInputs; else y is x), j the index of their first
// coefficient in a row put in the same order (for_widen16); returns how many values it wrote (none for other
// types).
template <bool kTwoInputs, typename T, typename F>
int64_t blocks16(const T* __restrict__ u, const T* __restrict__ v, T* __restrict__ out, int64_t len, const F& f) {
  int64_t i = 0;
#if defined(__AVX2__)
  if constexpr (kVector16<T>) {
    for (; i + 16 <= len; i += 16) {
      const Wide16 x = widen16(u + i), y = kTwoInputs ? widen16(v + i) : x;
      narrow16(out + i, {f(x.lo, y.lo, i), f(x.hi, y.hi, i + 8)});
    }
  }
#endif
  return i;
}

// A coefficient row of len values put in the order blocks16 and widen16 read T's values in (bfloat16:
// in_widen_order; other types as they are).
template <typename T, typename Acc>
void for_widen16(Acc* row, int64_t len) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) in_widen_order(row, len);
#endif
}

// Whole blocks of sixteen values converted through the passes' vector forms (widen16, narrow16; bfloat16's
// order (0–3, 8–11), (4–7, 12–15) undone here); return how many values they converted.
template <typename T>
int64_t vector_stores(T*, const float*, int64_t) {
  return 0;
}

template <typename T>
int64_t vector_loads(float*, const T*, int64_t) {
  return 0;
}

#if defined(__AVX2__)
int64_t vector_stores(c10::BFloat16* o, const float* p, int64_t n) {
  const auto quads = [](const float* a, const float* b) { return _mm256_setr_m128(_mm_loadu_ps(a), _mm_loadu_ps(b)); };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) narrow16(o + i, {quads(p + i, p + i + 8), quads(p + i + 4, p + i + 12)});
  return i;
}

int64_t vector_loads(float* o, const c10::BFloat16* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Wide16 v = widen16(p + i);
    _mm256_storeu2_m128(o + i + 8, o + i, v.lo);
    _mm256_storeu2_m128(o + i + 12, o + i + 4, v.hi);
  }
  return i;
}
#endif

#if defined(__AVX2__) && defined(__F16C__)
int64_t vector_stores(c10::Half* o, const float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) narrow16(o + i, {_mm256_loadu_ps(p + i), _mm256_loadu_ps(p + i + 8)});
  return i;
}

int64_t vector_loads(float* o, const c10::Half* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Wide16 v = widen16(p + i);
    _mm256_storeu_ps(o + i, v.lo);
    _mm256_storeu_ps(o + i + 8, v.hi);
  }
  return i;
}
#endif

// Values p[0..n) as float32 at o: 16-bit whole blocks of sixteen through vector_loads, the rest one at a time.
template <typename T>
void to_float(const T* __restrict__ p, float* __restrict__ o, int64_t n) {
  for (int64_t i = vector_loads(o, p, n); i < n; ++i) o[i] = load(p, i);
}

// One vector stored past the caches, p 32-byte aligned (AVX2): no read for ownership of the line, and the
// line does not evict data still to be read (an AVX2 non-temporal store; a plain store without AVX2). Stores
// are ordered with stream_fence() before the values are handed on.
#if defined(__AVX2__)
inline void stream_store(float* p, Vec<float>::type v) { _mm256_stream_ps(p, reinterpret_cast<__m256>(v)); }
inline void stream_store(double* p, Vec<double>::type v) { _mm256_stream_pd(p, reinterpret_cast<__m256d>(v)); }
inline void stream_fence() { _mm_sfence(); }
#else
template <typename T>
inline void stream_store(T* p, typename Vec<T>::type v) { Vec<T>::store(p, v); }
inline void stream_fence() {}
#endif

// out[i] for i < len, from value(i) (one element) and vector(i) (the vector from i): the whole 64-byte lines
// of out stored past the caches (stream_store, two or four vectors a line), the partial lines at either end one
// element at a time through the cache, so that no line is written both ways (a partly streamed line is merged
// in memory).
template <typename T, typename One, typename Many>
void store_streamed(T* __restrict__ out, int64_t len, const One& value, const Many& vector) {
  constexpr int64_t kLanes = Vec<T>::kLanes, kLine = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t to_boundary = (64 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % 64)) % 64;
  const int64_t head = std::min<int64_t>(len, to_boundary / static_cast<int64_t>(sizeof(T)));
  const int64_t body = len - (len - head) % kLine;
  for (int64_t i = 0; i < head; ++i) out[i] = value(i);
  static_assert(kLine == 2 * kLanes || kLine == 4 * kLanes, "two or four vectors a line");
  for (int64_t i = head; i < body; i += kLine) {
    stream_store(out + i, vector(i));
    stream_store(out + i + kLanes, vector(i + kLanes));
    if constexpr (kLine == 4 * kLanes) {  // 16-byte vectors
      stream_store(out + i + 2 * kLanes, vector(i + 2 * kLanes));
      stream_store(out + i + 3 * kLanes, vector(i + 3 * kLanes));
    }
  }
  for (int64_t i = body; i < len; ++i) out[i] = value(i);
}

// ---------------------------------------------------------------------------------------------------
// Reductions: shifted sums (Chan, Golub & LeVeque 1983). Each (n, c) run is shifted by its first value K,
// so Σ(x − K)² − (Σ(x − K))²/M cancels only as much as K lies off the mean, in units of the spread (a few
// σ), never like E[x²] − E[x]². Runs of kChunk values are summed in at::opmath_type (float for
// float/half/bfloat16, double for double; vectorised) and the chunks are added in float64.
// ---------------------------------------------------------------------------------------------------

// Shifted sums of one (n, c): Σ(x − K), Σ(x − K)², and with dy: Σ dy, Σ dy·(x − K).
struct RunSums {
  double shift = 0, x = 0, xx = 0, g = 0, gx = 0;
};

template <typename scalar_t, bool kGrad>
RunSums run_sums(const scalar_t* x, const scalar_t* dy, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  RunSums out;
  const acc_t K = load(x, 0);
  out.shift = K;
  int64_t body = 0;  // values summed in vector registers (float, double, bfloat16, float16 with F16C)
  if constexpr (kVectorLoads<scalar_t>) {
    using V = Vec<acc_t>;
    using T = typename V::type;
    constexpr int64_t L = V::kLanes;
    body = len - len % L;
    T k;
    for (int64_t l = 0; l < L; ++l) k[l] = K;
    for (int64_t start = 0; start < body; start += kChunk) {
      const int64_t end = std::min(body, start + kChunk);
      T s1 = {}, s2 = {}, sg = {}, sgx = {}, t1 = {}, t2 = {}, tg = {}, tgx = {};  // two of each: latency
      const auto add = [&](int64_t i, T& a1, T& a2, T& ag, T& agx) {
        const T d = load_acc(x + i) - k;
        a1 += d;
        a2 += d * d;
        if constexpr (kGrad) {
          const T gi = load_acc(dy + i);
          ag += gi;
          agx += gi * d;
        }
      };
      int64_t i = start;
      for (; i + 2 * L <= end; i += 2 * L) {
        add(i, s1, s2, sg, sgx);
        add(i + L, t1, t2, tg, tgx);
      }
      if (i < end) add(i, s1, s2, sg, sgx);  // end − i is L here
      out.x += V::lane_sum(s1 + t1);
      out.xx += V::lane_sum(s2 + t2);
      if constexpr (kGrad) {
        out.g += V::lane_sum(sg + tg);
        out.gx += V::lane_sum(sgx + tgx);
      }
    }
  }
  // The rest one value at a time: the last len % L values (an omp simd loop's set-up and lane sums cost more
  // than they save there, e.g. at 7×7), and float16 without F16C.
  for (int64_t start = body; start < len; start += kChunk) {
    const int64_t end = std::min(len, start + kChunk);
    acc_t s1 = 0, s2 = 0, sg = 0, sgx = 0;
    for (int64_t i = start; i < end; ++i) {
      const acc_t d = load(x, i) - K;
      s1 += d;
      s2 += d * d;
      if constexpr (kGrad) {
        const acc_t gi = load(dy, i);
        sg += gi;
        sgx += gi * d;
      }
    }
    out.x += s1;
    out.xx += s2;
    out.g += sg;
    out.gx += sgx;
  }
  return out;
}

// Per (n, c), as float64 arrays: the mean m, the centred sum of squares q = Σ (x − m)², and with dy
// Σ dy and Σ dy·(x − m). The arrays live in one per-thread workspace reused from call to call: fresh
// multi-page allocations on every call cost page faults (glibc may trim and re-fault them) that BatchNorm,
// which keeps only C-vectors, does not pay.
struct Moments {
  double *mean, *sumsq, *grad_sum, *grad_dot;
};

Moments workspace_moments(int64_t NC) {
  thread_local std::vector<double> workspace;
  if (workspace.size() < static_cast<size_t>(4 * NC)) workspace.resize(4 * NC);
  double* w = workspace.data();
  return {w, w + NC, w + 2 * NC, w + 3 * NC};
}

// The moments of one (n, c) from its shifted sums, written at index i of ``mo``.
void finish(const RunSums& s, double inv_m, Moments& mo, int64_t i, bool grad) {
  const double mean_shift = s.x * inv_m;  // mean − K
  mo.mean[i] = s.shift + mean_shift;
  mo.sumsq[i] = std::max(0.0, s.xx - s.x * mean_shift);
  if (grad) {
    mo.grad_sum[i] = s.g;
    mo.grad_dot[i] = s.gx - s.g * mean_shift;
  }
}

// Channels-last: one sample's (M, C) block, rows read in memory order, every column accumulating into
// small arrays that stay in L1 (BatchNorm's own channels-last kernels do the same): Σ(x − K), Σ(x − K)²,
// Σ dy, Σ dy·(x − K) with K the first row, in the accumulation type over chunks of kChunk rows and in float64
// across chunks. All arrays are structures of arrays, so every loop over the columns vectorises. While a
// sample's x and dy fit in a core's L2 (x at most 256 KiB), several rows go into each accumulator update: two
// (half the accumulator traffic: 15–25 % faster there), and in the column loop four (the moments pass alone
// 15–39 % faster again at six shapes, 5–17 % slower at C = 48–60 on 32×32 maps: docs/performance.md, "Session
// 21"); larger, memory-bound samples measured faster one row at a time, except samples of rows of 4 KiB or more
// up to 512 KiB (16×2048×7×7 training 1.07–1.17 → 0.99–1.15× BN in four blocks; 16×512×14×14 and 16×128×28×28,
// with narrower rows, were slower).
template <typename scalar_t, bool kGrad>
struct ColumnSums {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t C;
  std::vector<acc_t> part;   // K, s1, s2, sg, sgx: 5·C
  std::vector<double> total;  // x, xx, g, gx: 4·C

  static constexpr bool kStaged = kStaged16<scalar_t>;  // staged_rows
  std::vector<float> staged;  // float16: a group of rows of x and of dy in float32

  explicit ColumnSums(int64_t C) : C(C), part(5 * C), total(4 * C), staged(kStaged ? 2 * stage_rows() * C : 0) {}

  // One vector of the accumulation type: the lanes of a register-blocked column group.
  using Lanes = typename Vec<acc_t>::type;
  static constexpr int64_t kLanes = Vec<acc_t>::kLanes;
  // Each lane group walks the chunk's rows C values apart: for wide rows (2 KiB at C = 512) every row lies
  // on another page, where the hardware prefetchers do not follow. The two-row loop asks for the line four
  // lines ahead in each row, the one a later lane group reads (measured: 128×512×4×4 channels-last training
  // 1.47–1.98 → 1.32–1.51× BN, 64×436×8×8 1.33–1.41 → 1.09–1.11; 512 bytes ahead no better), into L2 only
  // (locality 1, prefetcht2: a walk's dozens of requests no longer wait on L1's fill buffers; 64×144×16×16
  // 1.22–1.24 → 1.03–1.13, 128×128×16×16 1.07–1.16 → 0.90–0.95 against prefetcht0; prefetcht1 in between).
  static constexpr int64_t kAhead = 256 / sizeof(acc_t);
  static Lanes load_lanes(const acc_t* p) { return Vec<acc_t>::load(p); }
  static void store_lanes(acc_t* p, Lanes v) { Vec<acc_t>::store(p, v); }

  // Bytes of one row (one position's C values): what decides the lane groups and the two-row updates.
  int64_t row_bytes() const { return C * static_cast<int64_t>(sizeof(scalar_t)); }

  // The first kAhead values of each row [r0, r1), which the lane groups' own prefetches (kAhead along the row)
  // never ask for: requested before the walks, so that the first groups do not wait on memory row by row.
  void prefetch_row_starts(const scalar_t* x, const scalar_t* dy, int64_t r0, int64_t r1) const {
    constexpr int64_t kLine = 64 / sizeof(acc_t);
    const acc_t* xs = reinterpret_cast<const acc_t*>(x);
    const acc_t* gs = reinterpret_cast<const acc_t*>(dy);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < kAhead; i += kLine) {
        __builtin_prefetch(xs + r * C + i, 0, 1);
        if constexpr (kGrad) __builtin_prefetch(gs + r * C + i, 0, 1);
      }
  }

  // Columns [c0, c0 + kLanes) over rows [r0, r1) with the five sums in registers: each row reads one
  // vector of x (and dy) and updates no memory, where the column loop of rows() loads and stores every
  // accumulator per row. Pairs of rows, then one (the column loop's order before its four-row updates: outputs
  // and gradients were bit-identical to its build then at three channels-last shapes). Only where the input is
  // already in the accumulation type (float32, float64).
  template <bool kTwoRows>
  void lane_block(const scalar_t* x, const scalar_t* dy, int64_t r0, int64_t r1, int64_t c0) {
    acc_t* s = part.data();
    const Lanes K = load_lanes(s + c0);
    Lanes s1 = load_lanes(s + C + c0), s2 = load_lanes(s + 2 * C + c0);
    Lanes sg = load_lanes(s + 3 * C + c0), sgx = load_lanes(s + 4 * C + c0);
    const acc_t* xs = reinterpret_cast<const acc_t*>(x) + c0;
    const acc_t* gs = kGrad ? reinterpret_cast<const acc_t*>(dy) + c0 : nullptr;
    int64_t r = r0;
    if constexpr (kTwoRows)
      for (; r + 2 <= r1; r += 2) {
        __builtin_prefetch(xs + r * C + kAhead, 0, 1);
        __builtin_prefetch(xs + (r + 1) * C + kAhead, 0, 1);
        if constexpr (kGrad) {
          __builtin_prefetch(gs + r * C + kAhead, 0, 1);
          __builtin_prefetch(gs + (r + 1) * C + kAhead, 0, 1);
        }
        const Lanes da = load_lanes(xs + r * C) - K, db = load_lanes(xs + (r + 1) * C) - K;
        s1 += da + db;
        s2 += da * da + db * db;
        if constexpr (kGrad) {
          const Lanes gva = load_lanes(gs + r * C), gvb = load_lanes(gs + (r + 1) * C);
          sg += gva + gvb;
          sgx += gva * da + gvb * db;
        }
      }
    for (; r < r1; ++r) {
      const Lanes d = load_lanes(xs + r * C) - K;
      s1 += d;
      s2 += d * d;
      if constexpr (kGrad) {
        const Lanes gi = load_lanes(gs + r * C);
        sg += gi;
        sgx += gi * d;
      }
    }
    store_lanes(s + C + c0, s1);
    store_lanes(s + 2 * C + c0, s2);
    if constexpr (kGrad) {
      store_lanes(s + 3 * C + c0, sg);
      store_lanes(s + 4 * C + c0, sgx);
    }
  }

  // Rows [r0, r1): register-blocked lane groups for samples that fit in L2 (kTwoRows) in the accumulation
  // type with rows of kLaneRowBytes up to kLaneRowMaxBytes, the column loop for the rest and for the last
  // C mod kLanes columns. Larger samples, and narrow rows (many rows a page), stream from L3 or memory, where
  // walking a chunk's rows once per lane group measured slower than the column loop, which reads them in memory
  // order (16×64×56×56 channels-last training 1.10–1.18 → 1.41–1.61× BN; 64×48×32×32 0.86–1.09 in the column
  // loop against 1.20–1.24 in lane groups; docs/performance.md). Rows of a page or more put every row of a
  // lane group's walk on a page of its own: there too the column loop is faster (session 19: 16×1024×7×7
  // 1.18–1.24 → 0.95–0.99× BN, 32×1024×7×7 1.30–1.31 → 1.17–1.18; rows of 2 KiB keep the lane groups, 64×512×8×8
  // 1.10–1.33 in them against 1.38–1.52).
  template <bool kTwoRows>
  void rows(const scalar_t* x, const scalar_t* dy, int64_t r0, int64_t r1) {
    if constexpr (kStaged) {
      staged_rows<kTwoRows>(x, dy, r0, r1);
      return;
    }
    int64_t c0 = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t> && kTwoRows)
      if (row_bytes() >= kLaneRowBytes && row_bytes() < kLaneRowMaxBytes) {
        prefetch_row_starts(x, dy, r0, r1);
        for (; c0 + kLanes <= C; c0 += kLanes) lane_block<kTwoRows>(x, dy, r0, r1, c0);
      }
    if (c0 < C) columns<kTwoRows>(x, dy, r0, r1, c0);
  }

  // float16 rows [r0, r1), a group at a time widened into float32 (F16C, sixteen values a step) and summed by
  // the column loop in float32, in the same order: inside its omp simd loops float16 widens only in the
  // branch-free scalar form, about ten instructions for eight values (channels-last float16 training took
  // 1.1–1.45× BatchNorm's time with it; session 26). Groups of a multiple of four rows keep the four-row updates.
  template <bool kTwoRows>
  void staged_rows(const scalar_t* x, const scalar_t* dy, int64_t r0, int64_t r1) {
    const int64_t group = stage_rows();
    float* xs = staged.data();
    float* gs = xs + group * C;
    for (int64_t r = r0; r < r1; r += group) {
      const int64_t n = std::min(group, r1 - r);
      to_float(x + r * C, xs, n * C);
      if constexpr (kGrad) to_float(dy + r * C, gs, n * C);
      columns<kTwoRows>(static_cast<const float*>(xs), kGrad ? gs : nullptr, 0, n, 0);
    }
  }

  // Rows a staged group holds: a multiple of four, about 16 KiB of float32 each for x and dy.
  int64_t stage_rows() const { return std::max<int64_t>(4, 4096 / C / 4 * 4); }

  template <bool kTwoRows, typename In>
  void columns(const In* x, const In* dy, int64_t r0, int64_t r1, int64_t c0) {
    const acc_t* __restrict__ K = part.data();
    acc_t* __restrict__ s1 = part.data() + C;
    acc_t* __restrict__ s2 = s1 + C;
    acc_t* __restrict__ sg = s2 + C;
    acc_t* __restrict__ sgx = sg + C;
    int64_t r = r0;
    if constexpr (kTwoRows)
      for (; r + 4 <= r1; r += 4) {  // four rows an update, then a pair, then one
        const In* __restrict__ xa = x + r * C;
        const In* __restrict__ xb = xa + C;
        const In* __restrict__ xc = xb + C;
        const In* __restrict__ xd = xc + C;
        const In* __restrict__ ga = kGrad ? dy + r * C : nullptr;
        const In* __restrict__ gb = kGrad ? ga + C : nullptr;
        const In* __restrict__ gc = kGrad ? gb + C : nullptr;
        const In* __restrict__ gd = kGrad ? gc + C : nullptr;
#pragma omp simd
        for (int64_t c = c0; c < C; ++c) {
          const acc_t da = load(xa, c) - K[c], db = load(xb, c) - K[c];
          const acc_t dc = load(xc, c) - K[c], dd = load(xd, c) - K[c];
          s1[c] += (da + db) + (dc + dd);
          s2[c] += (da * da + db * db) + (dc * dc + dd * dd);
          if constexpr (kGrad) {
            const acc_t gva = load(ga, c), gvb = load(gb, c), gvc = load(gc, c), gvd = load(gd, c);
            sg[c] += (gva + gvb) + (gvc + gvd);
            sgx[c] += (gva * da + gvb * db) + (gvc * dc + gvd * dd);
          }
        }
      }
    if constexpr (kTwoRows)
      for (; r + 2 <= r1; r += 2) {
        const In* __restrict__ xa = x + r * C;
        const In* __restrict__ xb = xa + C;
        const In* __restrict__ ga = kGrad ? dy + r * C : nullptr;
        const In* __restrict__ gb = kGrad ? ga + C : nullptr;
#pragma omp simd
        for (int64_t c = c0; c < C; ++c) {
          const acc_t da = load(xa, c) - K[c], db = load(xb, c) - K[c];
          s1[c] += da + db;
          s2[c] += da * da + db * db;
          if constexpr (kGrad) {
            const acc_t gva = load(ga, c), gvb = load(gb, c);
            sg[c] += gva + gvb;
            sgx[c] += gva * da + gvb * db;
          }
        }
      }
    for (; r < r1; ++r) {
      const In* __restrict__ xr = x + r * C;
      const In* __restrict__ gr = kGrad ? dy + r * C : nullptr;
#pragma omp simd
      for (int64_t c = c0; c < C; ++c) {
        const acc_t d = load(xr, c) - K[c];
        s1[c] += d;
        s2[c] += d * d;
        if constexpr (kGrad) {
          const acc_t gi = load(gr, c);
          sg[c] += gi;
          sgx[c] += gi * d;
        }
      }
    }
  }

  // The moments of sample n's block, written at mo[n·C .. n·C + C).
  void sample(const scalar_t* x, const scalar_t* dy, int64_t M, double inv_m, Moments& mo, int64_t n) {
    acc_t* __restrict__ K = part.data();
    for (int64_t c = 0; c < C; ++c) K[c] = load(x, c);
    const bool two_rows = M * row_bytes() <= (row_bytes() >= kLaneRowMaxBytes ? kTwoRowWideBytes : kTwoRowBytes);
    if (M <= kChunk) {  // one chunk: finished from the accumulation type directly
      std::fill(part.begin() + C, part.end(), acc_t(0));
      if (two_rows)
        rows<true>(x, dy, 0, M);
      else
        rows<false>(x, dy, 0, M);
      finish_all(part.data() + C, inv_m, mo, n);
      return;
    }
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t r0 = 0; r0 < M; r0 += kChunk) {
      const int64_t r1 = std::min(M, r0 + kChunk);
      std::fill(part.begin() + C, part.end(), acc_t(0));
      if (two_rows)
        rows<true>(x, dy, r0, r1);
      else
        rows<false>(x, dy, r0, r1);
      const acc_t* __restrict__ p = part.data() + C;
      double* __restrict__ t = total.data();
#pragma omp simd
      for (int64_t i = 0; i < 4 * C; ++i) t[i] += p[i];
    }
    finish_all(total.data(), inv_m, mo, n);
  }

  // finish() of every channel of sample n from its four sums (x, xx, g, gx: C values each, from ``sums``)
  // and the shifts K, in one vectorised loop.
  template <typename sum_t>
  void finish_all(const sum_t* sums, double inv_m, Moments& mo, int64_t n) {
    const acc_t* __restrict__ K = part.data();
    const sum_t* __restrict__ tx = sums;
    const sum_t* __restrict__ txx = sums + C;
    const sum_t* __restrict__ tg = sums + 2 * C;
    const sum_t* __restrict__ tgx = sums + 3 * C;
    double* __restrict__ mean = mo.mean + n * C;
    double* __restrict__ sumsq = mo.sumsq + n * C;
    double* __restrict__ grad_sum = mo.grad_sum + n * C;
    double* __restrict__ grad_dot = mo.grad_dot + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double x = tx[c], mean_shift = x * inv_m;  // as finish()
      mean[c] = static_cast<double>(K[c]) + mean_shift;
      sumsq[c] = std::max(0.0, static_cast<double>(txx[c]) - x * mean_shift);
      if constexpr (kGrad) {
        grad_sum[c] = tg[c];
        grad_dot[c] = static_cast<double>(tgx[c]) - static_cast<double>(tg[c]) * mean_shift;
      }
    }
  }
};

// All (n, c) in one read of x (and dy), summed and finished in parallel; into ``storage`` (4·N·C values) if
// given, else into the per-thread workspace.
template <bool kGrad>
Moments moments(const Tensor& x, const Tensor* dy, const Geometry& g, double* storage = nullptr) {
  const int64_t NC = g.N * g.C;
  Moments mo = storage ? Moments{storage, storage + NC, storage + 2 * NC, storage + 3 * NC} : workspace_moments(NC);
  const double inv_m = 1.0 / g.M;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_moments", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = kGrad ? dy->const_data_ptr<scalar_t>() : nullptr;
    if (!g.channels_last) {
      at::parallel_for(0, NC, std::max<int64_t>(1, 4096 / std::max<int64_t>(g.M, 1)), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          finish(run_sums<scalar_t, kGrad>(xp + b * g.M, kGrad ? gp + b * g.M : nullptr, g.M), inv_m, mo, b, kGrad);
      });
    } else {
      at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
        ColumnSums<scalar_t, kGrad> sums(g.C);
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t off = n * g.M * g.C;
          sums.sample(xp + off, kGrad ? gp + off : nullptr, g.M, inv_m, mo, n);
        }
      });
    }
  });
  return mo;
}

// Σ term(i) for i < len in float64 over chunks of kChunk values. With kVector (float32, float64, bfloat16 and,
// with F16C, float16 values: kVectorLoads) each chunk is summed in four vector accumulators held in registers,
// vector_term(i) giving the vector of terms from i: GCC keeps an omp simd reduction's lanes in a stack array,
// stored on every iteration, a chain of store-to-load latencies that made these the hot loops of the
// small-spatial paths, whose samples are read from L1. The tail, and other types, go through scalar_term(i) in an
// omp simd reduction.
template <typename acc_t, bool kVector, typename Many, typename One>
__attribute__((always_inline)) inline double chunked_sum(int64_t len, const Many& vector_term, const One& scalar_term) {
  double total = 0;
  int64_t body = 0;  // values summed in vector registers
  if constexpr (kVector) {
    using V = Vec<acc_t>;
    constexpr int64_t kLanes = V::kLanes, kStep = 4 * kLanes;
    static_assert(kChunk % kStep == 0, "whole steps per chunk");
    body = len - len % kStep;
    for (int64_t start = 0; start < body; start += kChunk) {
      const int64_t end = std::min(body, start + kChunk);
      typename V::type a = {}, b = {}, c = {}, d = {};
      for (int64_t i = start; i < end; i += kStep) {
        a += vector_term(i);
        b += vector_term(i + kLanes);
        c += vector_term(i + 2 * kLanes);
        d += vector_term(i + 3 * kLanes);
      }
      total += V::lane_sum((a + b) + (c + d));
    }
  }
  for (int64_t start = body; start < len; start += kChunk) {
    const int64_t end = std::min(len, start + kChunk);
    acc_t part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = start; i < end; ++i) part += scalar_term(i);
    total += part;
  }
  return total;
}

// Σ x² of one contiguous run (a whole sample, in either layout), float64 over chunks of kChunk values.
template <typename scalar_t>
double squares_of(const scalar_t* p, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  return chunked_sum<acc_t, kVectorLoads<scalar_t>>(
      len,
      [&](auto i) {
        const typename V::type u = load_acc(p + i);
        return u * u;
      },
      [&](int64_t i) { return load(p, i) * load(p, i); });
}

// ---------------------------------------------------------------------------------------------------
// Elementwise pass: out = u·A[n,c] (+ v·B[n,c]) + S[n,c], where every coefficient factors into a
// per-sample and a per-channel part (A = α_n a_c, B = β_n b_c + δ_n, S = σ_n s_c), so the N·C values are
// formed inside the parallel pass instead of in a serial O(N·C) loop before it.
// ---------------------------------------------------------------------------------------------------

struct Coefficients {
  std::vector<double> alpha, beta, delta, sigma;  // per sample (beta, delta only with a second input)
  std::vector<double> a, b, s;                    // per channel
  double A(int64_t n, int64_t c) const { return alpha[n] * a[c]; }
  double B(int64_t n, int64_t c) const { return beta[n] * b[c] + delta[n]; }
  double S(int64_t n, int64_t c) const { return sigma[n] * s[c]; }
};

// Whether a pass over ``tensors`` tensors of out's size (its inputs and out) touches too much for out to stay
// in the caches for its reader: then out is stored past them (no read for ownership of its lines). Measured
// in one build, the two paths alternating (docs/performance.md, session 13): eval streamed wins from 24 MiB
// outputs on and is mixed at 16–20 MiB; a layer's training call wins from 4–8 MiB on, but whole ResNet-56
// steps, whose next layer reads those outputs, were no faster streaming its 4–8 MiB ones.
bool past_the_caches(const Tensor& out, int64_t tensors) {
  return tensors * static_cast<int64_t>(out.nbytes()) >= kStreamBytes;
}

template <typename scalar_t, bool kTwoInputs>
struct AffinePass {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t>;
  static constexpr bool kCanStream = std::is_same_v<scalar_t, acc_t>;  // float, double
  const scalar_t* u;
  const scalar_t* v;
  scalar_t* out;
  const Geometry& g;
  const Coefficients& k;
  bool stream = false;  // out stored past the caches (float and double)

  // Rows layout: (n, c) runs b0..b1 of M contiguous values.
  void runs(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / g.C, c = b % g.C;
      const scalar_t* __restrict__ ub = u + b * g.M;
      scalar_t* __restrict__ ob = out + b * g.M;
      const acc_t ab = k.A(n, c), sb = k.S(n, c);
      if constexpr (kCanStream) {
        if (stream) {
          if constexpr (kTwoInputs) {
            const scalar_t* __restrict__ vb = v + b * g.M;
            const acc_t bb = k.B(n, c);
            store_streamed(
                ob, g.M, [&](int64_t i) { return ub[i] * ab + vb[i] * bb + sb; },
                [&](int64_t i) { return V::load(ub + i) * ab + V::load(vb + i) * bb + sb; });
          } else {
            store_streamed(
                ob, g.M, [&](int64_t i) { return ub[i] * ab + sb; },
                [&](int64_t i) { return V::load(ub + i) * ab + sb; });
          }
          continue;
        }
      }
      const int64_t body = body16(b, ub, ob, ab, sb);
      if constexpr (kTwoInputs) {
        const scalar_t* __restrict__ vb = v + b * g.M;
        const acc_t bb = k.B(n, c);
#pragma omp simd
        for (int64_t i = body; i < g.M; ++i)
          store(ob, i, load(ub, i) * ab + load(vb, i) * bb + sb);
      } else {
#pragma omp simd
        for (int64_t i = body; i < g.M; ++i) store(ob, i, load(ub, i) * ab + sb);
      }
    }
  }

  // 16-bit run b's whole blocks of sixteen values (GCC vectorises the loops above with half again as many
  // instructions for bfloat16, and not at all for float16: bfloat16 eval took 1.23–1.50× BatchNorm's time with
  // them, 0.94–1.15× with these; session 26); returns how many values it wrote (none for other types).
  int64_t body16(int64_t b, const scalar_t* __restrict__ ub, scalar_t* __restrict__ ob, acc_t ab, acc_t sb) const {
    if constexpr (!kVector16<scalar_t>) {
      return 0;
    } else {
      const scalar_t* vb = kTwoInputs ? v + b * g.M : ub;
      const acc_t bb = kTwoInputs ? static_cast<acc_t>(k.B(b / g.C, b % g.C)) : acc_t(0);
      return blocks16<kTwoInputs>(ub, vb, ob, g.M, [&](auto x, auto y, int64_t) {
        if constexpr (kTwoInputs)
          return x * ab + y * bb + sb;
        else
          return x * ab + sb;
      });
    }
  }

  // Channels-last: spatial rows r0..r1 (r = n·M + m) of C contiguous values, all of sample n; ``coef``
  // holds room for the sample's 2 or 3 coefficient rows of ``span()`` values. Streamed, the rows are swept
  // flat in chunks of kChunk values, the coefficients tiled (entry t for channel t % C): stores past the
  // caches want whole lines, which rows of a few hundred bytes split (row by row, 64×76×32×32 channels-last
  // training took 1.3–1.5× BatchNorm's time; flat, 0.6×).
  void rows_of_sample(int64_t n, int64_t r0, int64_t r1, acc_t* coef) const {
    const int64_t span = this->span();
    acc_t* __restrict__ an = coef;
    acc_t* __restrict__ sn = an + span;
    acc_t* __restrict__ bn = kTwoInputs ? sn + span : nullptr;
    for (int64_t c = 0; c < g.C; ++c) {
      an[c] = k.A(n, c);
      sn[c] = k.S(n, c);
      if constexpr (kTwoInputs) bn[c] = k.B(n, c);
    }
    if (tiled()) {
      for (int64_t t = g.C; t < span; ++t) {
        an[t] = an[t - g.C];
        sn[t] = sn[t - g.C];
        if constexpr (kTwoInputs) bn[t] = bn[t - g.C];
      }
      for (int64_t start = r0 * g.C, end = r1 * g.C; start < end; start += kChunk) {
        const int64_t off = start % g.C, len = std::min(end, start + kChunk) - start;
        const scalar_t* __restrict__ uc = u + start;
        const acc_t *__restrict__ ac = an + off, *__restrict__ sc = sn + off;
        if constexpr (kCanStream) {
          if constexpr (kTwoInputs) {
            const scalar_t* __restrict__ vc = v + start;
            const acc_t* __restrict__ bc = bn + off;
            store_streamed(
                out + start, len, [&](int64_t i) { return uc[i] * ac[i] + vc[i] * bc[i] + sc[i]; },
                [&](int64_t i) {
                  return V::load(uc + i) * V::load(ac + i) + V::load(vc + i) * V::load(bc + i) + V::load(sc + i);
                });
          } else {
            store_streamed(
                out + start, len, [&](int64_t i) { return uc[i] * ac[i] + sc[i]; },
                [&](int64_t i) { return V::load(uc + i) * V::load(ac + i) + V::load(sc + i); });
          }
        } else {
          chunk16(uc, kTwoInputs ? v + start : nullptr, out + start, len, ac, sc, kTwoInputs ? bn + off : nullptr);
        }
      }
      return;
    }
    for (acc_t* row : {an, sn, bn})  // as row_body16 reads them
      if (row != nullptr) for_widen16<scalar_t>(row, g.C);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ ur = u + r * g.C;
      scalar_t* __restrict__ orow = out + r * g.C;
      if constexpr (kCanStream) {  // float, double: two vectors a step
        constexpr int64_t L = V::kLanes;
        const scalar_t* __restrict__ vr = kTwoInputs ? v + r * g.C : nullptr;
        const auto at = [&](int64_t c) {  // the scalar loops' order of operations
          if constexpr (kTwoInputs)
            return V::load(ur + c) * V::load(an + c) + V::load(vr + c) * V::load(bn + c) + V::load(sn + c);
          else
            return V::load(ur + c) * V::load(an + c) + V::load(sn + c);
        };
        int64_t c = 0;
        for (; c + 2 * L <= g.C; c += 2 * L) {
          const auto y0 = at(c), y1 = at(c + L);
          V::store(orow + c, y0);
          V::store(orow + c + L, y1);
        }
        for (; c + L <= g.C; c += L) V::store(orow + c, at(c));
        for (; c < g.C; ++c) {
          if constexpr (kTwoInputs)
            orow[c] = ur[c] * an[c] + vr[c] * bn[c] + sn[c];
          else
            orow[c] = ur[c] * an[c] + sn[c];
        }
        continue;
      }
      const int64_t body = row_body16(r, ur, orow, an, sn, bn);
      if constexpr (kTwoInputs) {
        const scalar_t* __restrict__ vr = v + r * g.C;
#pragma omp simd
        for (int64_t c = body; c < g.C; ++c)
          store(orow, c, load(ur, c) * an[c] + load(vr, c) * bn[c] + sn[c]);
      } else {
#pragma omp simd
        for (int64_t c = body; c < g.C; ++c) store(orow, c, load(ur, c) * an[c] + sn[c]);
      }
    }
  }

  // Channels-last 16-bit row r's whole blocks of sixteen channels, coefficient rows in widen16's order; returns
  // how many it wrote (as body16).
  int64_t row_body16(int64_t r, const scalar_t* __restrict__ ur, scalar_t* __restrict__ orow, const acc_t* an,
                     const acc_t* sn, const acc_t* bn) const {
    if constexpr (!kVector16<scalar_t>) {
      return 0;
    } else {
      using VA = Vec<acc_t>;
      return blocks16<kTwoInputs>(ur, kTwoInputs ? v + r * g.C : ur, orow, g.C, [&](auto x, auto y, int64_t c) {
        if constexpr (kTwoInputs)
          return x * VA::load(an + c) + y * VA::load(bn + c) + VA::load(sn + c);
        else
          return x * VA::load(an + c) + VA::load(sn + c);
      });
    }
  }

  // Whether channels-last rows are swept flat, with tiled coefficient rows: streamed float32/float64, and 16-bit
  // rows that end in a partial block of sixteen (row by row, those tails went one value at a time: float16 eval
  // took 1.5–2.5× BatchNorm's time at C = 3–124).
  bool tiled() const { return (kCanStream && stream) || (kVector16<scalar_t> && g.C % 16 != 0); }

  // Values in each coefficient row: C, or C + kChunk tiled for the flat sweep.
  int64_t span() const { return tiled() ? g.C + kChunk : g.C; }

  // A flat 16-bit chunk of len values, coefficients tiled from ac, sc (and bc): sixteen values a step in
  // load_acc's order, the last len mod 16 one at a time.
  void chunk16(const scalar_t* __restrict__ uc, const scalar_t* __restrict__ vc, scalar_t* __restrict__ oc, int64_t len,
               const acc_t* __restrict__ ac, const acc_t* __restrict__ sc, const acc_t* __restrict__ bc) const {
    using VA = Vec<acc_t>;
    const int64_t body = blocks16_in_order(oc, len, [&](auto i) {
      if constexpr (kTwoInputs)
        return load_acc(uc + i) * VA::load(ac + i) + load_acc(vc + i) * VA::load(bc + i) + VA::load(sc + i);
      else
        return load_acc(uc + i) * VA::load(ac + i) + VA::load(sc + i);
    });
    for (int64_t i = body; i < len; ++i) {
      if constexpr (kTwoInputs)
        store(oc, i, load(uc, i) * ac[i] + load(vc, i) * bc[i] + sc[i]);
      else
        store(oc, i, load(uc, i) * ac[i] + sc[i]);
    }
  }

  void rows(int64_t r0, int64_t r1) const {
    std::vector<acc_t> coef((kTwoInputs ? 3 : 2) * span());
    while (r0 < r1) {
      const int64_t n = r0 / g.M, end = std::min(r1, (n + 1) * g.M);
      rows_of_sample(n, r0, end, coef.data());
      r0 = end;
    }
  }

  // Samples n0..n1, whole.
  void samples(int64_t n0, int64_t n1) const {
    if (g.channels_last)
      rows(n0 * g.M, n1 * g.M);
    else
      runs(n0 * g.C, n1 * g.C);
    if (stream) stream_fence();
  }

  void all() const {
    const int64_t count = g.channels_last ? g.N * g.M : g.N * g.C, width = g.channels_last ? g.C : g.M;  // rows or runs
    at::parallel_for(0, count, std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1)),
                     [&](int64_t i0, int64_t i1) {
                       g.channels_last ? rows(i0, i1) : runs(i0, i1);
                       if (stream) stream_fence();
                     });
  }
};

// y = x·r_n·gain_c + shift_c
Coefficients output_coefficients(const std::vector<double>& scale, const std::vector<double>& gain,
                                 const std::vector<double>& shift) {
  Coefficients k;
  k.alpha = scale;
  k.sigma.assign(scale.size(), 1.0);
  k.a = gain;
  k.s = shift;
  return k;
}

// ---------------------------------------------------------------------------------------------------
// O(N·C) algebra in float64
// ---------------------------------------------------------------------------------------------------

struct Statistics {
  std::vector<double> scale;  // r_n = target / max(‖x_n‖, ε_l2)
  std::vector<double> norm;   // ‖x_n‖
  std::vector<double> mu;     // μ_c of z = r_n x
  std::vector<double> var;    // biased σ²_c of z
};

// Evaluation's channel statistics: the running ones (0 and 1 where the layer keeps none).
void use_running_statistics(Statistics& st, const std::optional<Tensor>& running_mean,
                            const std::optional<Tensor>& running_var, int64_t C) {
  st.mu = to_vector(running_mean, C, 0.0);
  st.var = to_vector(running_var, C, 1.0);
}

double target_norm(const Geometry& g, bool rescale) {
  return rescale ? std::sqrt(static_cast<double>(g.C * g.M)) : 1.0;
}

// r_n; a sample holding an inf or NaN (moments inf or NaN) gets r_n = 0, so only its channel's statistics
// become NaN, as in BatchNorm.
double sample_scale(double squares, double target, double l2_eps) {
  if (std::isnan(squares)) return 0.0;
  return target / std::max(std::sqrt(squares), l2_eps);
}

// The O(N·C) loops below run in parallel over samples or over channels, each value summed in the same order
// as a serial loop (results do not depend on the thread count); ranges of fewer than this many values stay on
// one thread.
int64_t algebra_grain(int64_t inner) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1));
}

// ‖x_n‖² = Σ_c (q + M·m²), r_n; with batch statistics also μ_c = mean_n r_n m and
// σ²_c = Σ_n r_n² q / (N·M) + mean_n (r_n m − μ_c)² (Chan et al.'s pooled variance: no cancellation).
Statistics statistics(const Moments& mo, const Geometry& g, bool rescale, double l2_eps, bool batch) {
  Statistics st;
  st.norm.assign(g.N, 0.0);
  st.scale.resize(g.N);
  const double target = target_norm(g, rescale);
  at::parallel_for(0, g.N, algebra_grain(g.C), [&](int64_t n0, int64_t n1) {
    using V = Vec<double>;
    const double M = static_cast<double>(g.M);
    for (int64_t n = n0; n < n1; ++n) {  // in vector registers: a float64 add's latency per channel otherwise
      const double* __restrict__ mean = mo.mean + n * g.C;
      const double* __restrict__ sumsq = mo.sumsq + n * g.C;
      const double squares = chunked_sum<double, true>(
          g.C, [&](int64_t c) { return V::load(sumsq + c) + M * V::load(mean + c) * V::load(mean + c); },
          [&](int64_t c) { return sumsq[c] + M * mean[c] * mean[c]; });
      st.norm[n] = std::sqrt(squares);
      st.scale[n] = sample_scale(squares, target, l2_eps);
    }
  });
  if (!batch) return st;
  st.mu.assign(g.C, 0.0);
  st.var.assign(g.C, 0.0);
  const double inv_n = 1.0 / g.N, inv_count = 1.0 / (static_cast<double>(g.N) * g.M);
  at::parallel_for(0, g.C, algebra_grain(g.N), [&](int64_t c0, int64_t c1) {  // every channel sums in n order
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = c0; c < c1; ++c) st.mu[c] += st.scale[n] * mo.mean[n * g.C + c];
    for (int64_t c = c0; c < c1; ++c) st.mu[c] *= inv_n;
    for (int64_t n = 0; n < g.N; ++n) {
      const double r = st.scale[n], r2 = r * r * inv_count;
      const double* mean = mo.mean + n * g.C;
      const double* sumsq = mo.sumsq + n * g.C;
      for (int64_t c = c0; c < c1; ++c) {
        const double between = r * mean[c] - st.mu[c];
        st.var[c] += r2 * sumsq[c] + between * between * inv_n;
      }
    }
  });
  return st;
}

// A finite sample whose sum of squares overflowed (values beyond ~1e19 summed in float): refuse with the
// message kernels/overflow.py catches, before anything is written; it reruns on the sample rescaled by a
// power of two. Samples holding inf or NaN are not refused (r_n = 0, their channel turns NaN). The usual
// case costs one pass over N values; only samples with a non-finite norm are read again.
constexpr const char* kOverflowMessage = "l2bn: a finite sample's sum of squares overflows";  // overflow.MESSAGE

void check_no_overflow(const Tensor& x, const std::vector<double>& squares) {  // ‖x_n‖² or ‖x_n‖
  for (int64_t n = 0; n < x.size(0); ++n) {
    TORCH_CHECK(std::isfinite(squares[n]) || !at::isfinite(x[n]).all().item<bool>(), kOverflowMessage, " (sample ",
                n, ")");
  }
}

// F.batch_norm's update with the statistics of `count` values a channel (all ranks' for synchronized L2BN).
void update_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                          const Statistics& st, double count, double momentum) {
  if (!running_mean.has_value() || !running_mean->defined()) return;
  std::vector<double> unbiased(st.var);
  for (double& v : unbiased) v *= count / (count - 1);
  Tensor rm = *running_mean, rv = *running_var;
  blend_into(rm, st.mu, momentum);
  blend_into(rv, unbiased, momentum);
}

// Per-channel gain w·invstd and shift b − μ·gain of the output y = r_n·x·gain + shift.
void channel_affine(const Statistics& st, const std::vector<double>& w, const std::vector<double>& b, double eps,
                    std::vector<double>& gain, std::vector<double>& shift) {
  const int64_t C = static_cast<int64_t>(w.size());
  gain.resize(C);
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    gain[c] = w[c] / std::sqrt(st.var[c] + eps);
    shift[c] = b[c] - st.mu[c] * gain[c];
  }
}

// ---------------------------------------------------------------------------------------------------
// Small spatial sizes (M ≤ kSmallM: BatchNorm1d's (N, C), 1×1, 2×2 and 4×4 maps). Per-(n, c) runs of a few
// values would make every pass a loop over N·C runs of length M, and per-(n, c) moments would be a sizeable
// fraction of the data. Instead every loop runs over rows of contiguous values with one per-position pattern:
// a rows-layout sample is one row of D = C·M values (position i belongs to channel i / M), a channels-last
// sample M rows of the C channels. Per-channel coefficients are expanded once per call to per-position arrays
// of a row's length, and the batch sums are kept per position, folded into channels once per group of samples.
//
//   statistics   per sample: ‖x_n‖² (one read), then, while the sample is in cache, Σ (z − K) and
//                Σ (z − K)² of z = r_n x, with K = z of sample 0 at that channel (shifted sums across the
//                batch), and with dy Σ dy and Σ dy·(z − K)
//   output       y = x·(r_n gain_c) + shift_c
//   input grad   per sample, in cache: T_n = Σ dz·x, then dx = r_n (dz − x T_n / ‖x_n‖²); channels-last 4×4:
//                T_n from per-(n, c) Σ x, Σ x², Σ dy·x kept by the statistics' read, and dx in one pass
//
// Groups hold a fixed number of samples (it depends on D and M only), summed in the accumulation type (at
// most kChunk values per sum) and added in float64 in group order, so results do not depend on the thread
// count. Within a group, blocks of samples small enough to stay in cache are read twice (norms, then sums),
// the sums one tile of positions at a time, so that a tile's 2 or 4 accumulators stay in L1 across the block.
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kSmallM = 16;
constexpr int64_t kSmallD = 16384;

// Up to 2×2 every call takes this path; 4×4 training only. Measured (docs/performance.md): at 4×4 eval's
// per-sample pass was faster; at 8×8 training (kSmallM = 64) this path was slower in NCHW (0.49–0.61 →
// 0.77–0.89× BN) and no faster in channels-last.
constexpr int64_t kSmallAnyM = 4;

bool small_spatial(const Geometry& g, bool training) {
  if (g.C * g.M > kSmallD) return false;
  return g.M <= kSmallAnyM || (g.M <= kSmallM && training);
}

// A sample as rows that share one per-position pattern: channels-last, M rows of the C channels; rows layout,
// one row of all D = C·M values.
struct SampleRows {
  int64_t count, length;
};

SampleRows sample_rows(const Geometry& g) {
  return g.channels_last ? SampleRows{g.M, g.C} : SampleRows{1, g.C * g.M};
}

// A per-channel vector expanded to the positions of a row, in the accumulation type. One value a channel (a
// channels-last row, or M = 1) is a plain conversion loop: a fill per channel took ~7 µs of a (128, 512)
// training call's ~200 at one thread, about the time of its forward's output pass.
template <typename acc_t>
std::vector<acc_t> per_position(const Geometry& g, const std::vector<double>& v) {
  const int64_t run = g.channels_last ? 1 : g.M;  // a channel's consecutive positions in a row
  std::vector<acc_t> out(g.C * run);
  acc_t* __restrict__ o = out.data();
  const double* __restrict__ in = v.data();
  if (run == 1) {
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<acc_t>(in[c]);
  } else {
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t m = 0; m < run; ++m) o[c * run + m] = static_cast<acc_t>(in[c]);
  }
  return out;
}

// Per-position sums (a row) added into per-channel float64 sums (C).
template <typename acc_t>
void fold(const Geometry& g, const acc_t* __restrict__ positions, double* __restrict__ channels) {
  if (g.channels_last) {
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) channels[c] += positions[c];
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      double sum = 0;
      for (int64_t m = 0; m < g.M; ++m) sum += positions[c * g.M + m];
      channels[c] += sum;
    }
  }
}

// Samples per group: a group's per-position sums are kept in the accumulation type (at most kChunk values
// per sum) and folded into float64 channel sums once, in group order (fixed by the shape, not the threads).
int64_t samples_per_group(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(kChunk / g.M, std::max<int64_t>(16, 32768 / (g.C * g.M))));
}

constexpr int64_t kCacheValues = 16384;  // samples read twice (norm, then sums) in blocks of this many values
constexpr int64_t kTile = 1024;          // positions whose 2 or 4 sums stay in L1 across a block of samples

// Per sample ‖x_n‖² and r_n; per channel (float64) Σ (z − K), Σ (z − K)² and with dy Σ dy, Σ dy·(z − K).
// kSampleSums (channels-last backward): per (n, c) also Σ_S x, Σ_S x², Σ_S dy·x into ``sample_sums``
// ((N, 3, C) in the accumulation type, zeroed by the caller), from which small_input_grad forms T_n without a
// pass of its own.
struct SmallSums {
  std::vector<double> squares, scale;  // per sample
  std::vector<double> z, zz, g, gz;    // per channel
};

template <typename scalar_t, bool kGrad, bool kSampleSums = false>
SmallSums small_sums(const scalar_t* xp, const scalar_t* gp, const Geometry& g, const std::vector<double>& K,
                     double target, double l2_eps, at::opmath_type<scalar_t>* sample_sums = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(kGrad || !kSampleSums, "per-sample sums are the backward's");
  constexpr bool kStaged = kStaged16<scalar_t>;
  const int64_t N = g.N, C = g.C, D = g.C * g.M, width = kGrad ? 4 : 2;
  const SampleRows rows = sample_rows(g);
  const int64_t L = rows.length;
  const int64_t per_group = samples_per_group(g), groups = (N + per_group - 1) / per_group;
  const int64_t per_block = std::max<int64_t>(1, kCacheValues / D);
  const std::vector<acc_t> Kp = per_position<acc_t>(g, K);
  SmallSums out;
  out.squares.assign(N, 0.0);
  out.scale.assign(N, 0.0);
  std::vector<double> partial(groups * width * C, 0.0);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    // the sums sit kPad values apart beyond a row, so that a store to one array and a load from the next do
    // not share their low 12 address bits (4K aliasing stalls the loop when L is a multiple of 1024)
    constexpr int64_t kPad = 80;
    const int64_t stride = L + kPad;
    std::vector<acc_t> acc(width * stride);
    std::vector<float> x_staged(kStaged ? per_block * D : 0), g_staged(kStaged && kGrad ? per_block * D : 0);
    for (int64_t grp = g0; grp < g1; ++grp) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t group_end = std::min(N, (grp + 1) * per_group);
      for (int64_t n0 = grp * per_group; n0 < group_end; n0 += per_block) {
        const int64_t n1 = std::min(group_end, n0 + per_block);
        for (int64_t n = n0; n < n1; ++n) {  // the block's norms, which bring its samples into cache
          out.squares[n] = squares_of(xp + n * D, D);
          out.scale[n] = sample_scale(out.squares[n], target, l2_eps);
        }
        const int64_t j0 = n0 * rows.count, j1 = n1 * rows.count;  // the block's rows, in memory order
        // the block's rows from x_block (and g_block), which hold sample n0 first: x itself, or float16 staged
        // in float32
        const auto sum_rows = [&](auto* x_block, auto* g_block) {
          using In = std::remove_cv_t<std::remove_pointer_t<decltype(x_block)>>;
          for (int64_t t0 = 0; t0 < L; t0 += kTile) {
            const int64_t len = std::min(L, t0 + kTile) - t0;
            acc_t* __restrict__ s1 = acc.data() + t0;
            acc_t* __restrict__ s2 = s1 + stride;
            acc_t* __restrict__ sg = s2 + stride;
            acc_t* __restrict__ sgz = kGrad ? sg + stride : nullptr;
            const acc_t* __restrict__ k = Kp.data() + t0;
            for (int64_t j = j0; j < j1;) {  // the block's rows
              // two rows per accumulator update (half the L1 traffic of the sums), paired up to the block's end
              // or, where per-sample sums are kept, to the sample's end
              const int64_t pair_end = kSampleSums ? std::min(j1, (j / rows.count + 1) * rows.count) : j1;
              for (; j + 2 <= pair_end; j += 2) {
                const In* __restrict__ xa = x_block + (j - j0) * L + t0;
                const In* __restrict__ xb = xa + L;
                const acc_t ra = static_cast<acc_t>(out.scale[j / rows.count]);
                const acc_t rb = static_cast<acc_t>(out.scale[(j + 1) / rows.count]);
                if constexpr (kGrad) {
                  const In* __restrict__ ga = g_block + (j - j0) * L + t0;
                  const In* __restrict__ gb = ga + L;
                  acc_t* __restrict__ u = kSampleSums ? sample_sums + (j / rows.count) * 3 * L + t0 : nullptr;
#pragma omp simd
                  for (int64_t i = 0; i < len; ++i) {
                    const acc_t xva = load(xa, i), xvb = load(xb, i);
                    const acc_t da = xva * ra - k[i], db = xvb * rb - k[i];
                    const acc_t gva = load(ga, i), gvb = load(gb, i);
                    s1[i] += da + db;
                    s2[i] += da * da + db * db;
                    sg[i] += gva + gvb;
                    sgz[i] += gva * da + gvb * db;
                    if constexpr (kSampleSums) {
                      u[i] += xva + xvb;
                      u[L + i] += xva * xva + xvb * xvb;
                      u[2 * L + i] += gva * xva + gvb * xvb;
                    }
                  }
                } else {
#pragma omp simd
                  for (int64_t i = 0; i < len; ++i) {
                    const acc_t da = load(xa, i) * ra - k[i], db = load(xb, i) * rb - k[i];
                    s1[i] += da + db;
                    s2[i] += da * da + db * db;
                  }
                }
              }
              if (j < pair_end) {
                const In* __restrict__ xs = x_block + (j - j0) * L + t0;
                const acc_t r = static_cast<acc_t>(out.scale[j / rows.count]);
                if constexpr (kGrad) {
                  const In* __restrict__ gs = g_block + (j - j0) * L + t0;
                  acc_t* __restrict__ u = kSampleSums ? sample_sums + (j / rows.count) * 3 * L + t0 : nullptr;
#pragma omp simd
                  for (int64_t i = 0; i < len; ++i) {
                    const acc_t xv = load(xs, i), gv = load(gs, i);
                    const acc_t d = xv * r - k[i];
                    s1[i] += d;
                    s2[i] += d * d;
                    sg[i] += gv;
                    sgz[i] += gv * d;
                    if constexpr (kSampleSums) {
                      u[i] += xv;
                      u[L + i] += xv * xv;
                      u[2 * L + i] += gv * xv;
                    }
                  }
                } else {
#pragma omp simd
                  for (int64_t i = 0; i < len; ++i) {
                    const acc_t d = load(xs, i) * r - k[i];
                    s1[i] += d;
                    s2[i] += d * d;
                  }
                }
                ++j;
              }
            }
          }
        };
        if constexpr (kStaged) {  // float16: the block widened with F16C (as ColumnSums::staged_rows)
          to_float(xp + n0 * D, x_staged.data(), (n1 - n0) * D);
          if constexpr (kGrad) to_float(gp + n0 * D, g_staged.data(), (n1 - n0) * D);
          sum_rows(static_cast<const float*>(x_staged.data()), static_cast<const float*>(g_staged.data()));
        } else {
          sum_rows(xp + n0 * D, kGrad ? gp + n0 * D : xp);
        }
      }
      for (int64_t j = 0; j < width; ++j) fold(g, acc.data() + j * stride, partial.data() + (grp * width + j) * C);
    }
  });
  std::vector<double> total(width * C, 0.0);
  for (int64_t b = 0; b < groups; ++b)
    for (int64_t i = 0; i < width * C; ++i) total[i] += partial[b * width * C + i];
  out.z.assign(total.begin(), total.begin() + C);
  out.zz.assign(total.begin() + C, total.begin() + 2 * C);
  if (kGrad) {
    out.g.assign(total.begin() + 2 * C, total.begin() + 3 * C);
    out.gz.assign(total.begin() + 3 * C, total.end());
  }
  return out;
}

// The shift K_c of the batch sums: z of sample 0 at channel c (first position), 0 where it is not finite.
template <typename scalar_t>
std::vector<double> first_sample_shift(const scalar_t* xp, const Geometry& g, double target, double l2_eps) {
  const int64_t D = g.C * g.M;
  const double r = sample_scale(squares_of(xp, D), target, l2_eps);
  std::vector<double> K(g.C, 0.0);
  for (int64_t c = 0; c < g.C; ++c) {
    const double z = r * static_cast<double>(load(xp, g.channels_last ? c : c * g.M));
    K[c] = std::isfinite(z) ? z : 0.0;
  }
  return K;
}

// y = x·(r_n gain_c) + shift_c over samples n0..n1 (r_n from ``scale``, or from each sample's norm when
// ``squares`` is given: eval, where the norm is read in the same pass).
template <typename scalar_t>
void small_output(const scalar_t* xp, scalar_t* yp, const Geometry& g, const std::vector<double>& gain,
                  const std::vector<double>& shift, std::vector<double>& scale, std::vector<double>* squares,
                  double target, double l2_eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  const int64_t D = g.C * g.M;
  const SampleRows rows = sample_rows(g);
  const int64_t L = rows.length;
  std::vector<acc_t> a = per_position<acc_t>(g, gain), s = per_position<acc_t>(g, shift);
  for (acc_t* row : {a.data(), s.data()}) for_widen16<scalar_t>(row, L);  // as blocks16 reads them
  at::parallel_for(0, g.N, std::max<int64_t>(1, 32768 / D), [&](int64_t n0, int64_t n1) {
    const acc_t* __restrict__ ap = a.data();
    const acc_t* __restrict__ sp = s.data();
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* __restrict__ xs = xp + n * D;
      scalar_t* __restrict__ ys = yp + n * D;
      if (squares != nullptr) {
        (*squares)[n] = squares_of(xs, D);
        scale[n] = sample_scale((*squares)[n], target, l2_eps);
      }
      const acc_t r = static_cast<acc_t>(scale[n]);
      for (int64_t m = 0; m < rows.count; ++m) {
        const scalar_t* __restrict__ xr = xs + m * L;
        scalar_t* __restrict__ yr = ys + m * L;
        const int64_t body = blocks16<false>(
            xr, xr, yr, L, [&](auto v, auto, int64_t j) { return v * r * V::load(ap + j) + V::load(sp + j); });
#pragma omp simd
        for (int64_t i = body; i < L; ++i) store(yr, i, load(xr, i) * r * ap[i] + sp[i]);
      }
    }
  });
}

// T_n = Σ dz·x = Σ_c (A_c Σ_S dy·x + r_n b_c Σ_S x² + E_c Σ_S x) from small_sums' per-sample sums (N, 3, C).
template <typename acc_t>
double sample_dot(const acc_t* u, const std::vector<double>& A, const std::vector<double>& b,
                  const std::vector<double>& E, double r) {
  const int64_t C = static_cast<int64_t>(A.size());
  const double* __restrict__ a = A.data();
  const double* __restrict__ bb = b.data();
  const double* __restrict__ e = E.data();
  double t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t c = 0; c < C; ++c) t += a[c] * u[2 * C + c] + r * bb[c] * u[C + c] + e[c] * u[c];
  return t;
}

// Σ dz·x over one row of a sample, dz = a·dy + r·b·x + e (a, b, e per position), float64 over chunks of kChunk
// values (chunked_sum: as an omp simd reduction this sweep took twice the dx pass's time at (128, 512)).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
double row_dz_dot_x(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, const acc_t* __restrict__ a,
                    const acc_t* __restrict__ b, const acc_t* __restrict__ e, acc_t r, int64_t len) {
  using V = Vec<acc_t>;
  return chunked_sum<acc_t, kVectorLoads<scalar_t>>(
      len,
      [&](auto i) {
        const typename V::type xv = load_acc(x + i);
        return xv * (V::load(a + i) * load_acc(dy + i) + r * V::load(b + i) * xv + V::load(e + i));
      },
      [&](int64_t i) {
        const acc_t xv = load(x, i);
        return xv * (a[i] * load(dy, i) + r * b[i] * xv + e[i]);
      });
}

// dx = r_n (dz − x T_n / ‖x_n‖²), dz = A_c dy + r_n b_c x + E_c, T_n = Σ dz·x (0 where the norm was clamped;
// NaN where the sample holds NaN, as on the other paths): a pass over the sample for T_n, then dx while the
// sample is in cache; with ``sample_sums`` (channels-last: small_sums' per-sample sums) T_n from those and dx in
// one pass.
template <typename scalar_t>
void small_input_grad(const scalar_t* gp, const scalar_t* xp, scalar_t* dxp, const Geometry& g,
                      const std::vector<double>& A, const std::vector<double>& b, const std::vector<double>& E,
                      const SmallSums& sums, double l2_eps,
                      const at::opmath_type<scalar_t>* sample_sums = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  const int64_t D = g.C * g.M;
  const SampleRows rows = sample_rows(g);
  const int64_t L = rows.length;
  const std::vector<acc_t> Ap = per_position<acc_t>(g, A), bp = per_position<acc_t>(g, b),
                           Ep = per_position<acc_t>(g, E);
  at::parallel_for(0, g.N, std::max<int64_t>(1, 16384 / D), [&](int64_t n0, int64_t n1) {
    const acc_t* __restrict__ a = Ap.data();
    const acc_t* __restrict__ bb = bp.data();
    const acc_t* __restrict__ e = Ep.data();
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* __restrict__ xs = xp + n * D;
      const scalar_t* __restrict__ gs = gp + n * D;
      scalar_t* __restrict__ out = dxp + n * D;
      const acc_t r = static_cast<acc_t>(sums.scale[n]);
      double t = sample_sums == nullptr ? 0.0 : sample_dot(sample_sums + n * 3 * g.C, A, b, E, sums.scale[n]);
      for (int64_t m = 0; sample_sums == nullptr && m < rows.count; ++m)  // (as an if/else: 1-2 % slower at (128, 512))
        t += row_dz_dot_x(xs + m * L, gs + m * L, a, bb, e, r, L);
      const double squares = sums.squares[n];
      const double u = std::sqrt(squares) <= l2_eps ? 0.0 : t / squares;
      const acc_t p = r, q = static_cast<acc_t>(sums.scale[n] * u);
      for (int64_t m = 0; m < rows.count; ++m) {
        const scalar_t* __restrict__ xr = xs + m * L;
        const scalar_t* __restrict__ gr = gs + m * L;
        scalar_t* __restrict__ outr = out + m * L;
        const int64_t body = blocks16_in_order(outr, L, [&](auto i) {
          const auto xv = load_acc(xr + i);
          return p * (V::load(a + i) * load_acc(gr + i) + r * V::load(bb + i) * xv + V::load(e + i)) - xv * q;
        });
#pragma omp simd
        for (int64_t i = body; i < L; ++i) {
          const acc_t xv = load(xr, i);
          store(outr, i, p * (a[i] * load(gr, i) + r * bb[i] * xv + e[i]) - xv * q);
        }
      }
    }
  });
}

// μ_c and the biased σ²_c of z from the shifted batch sums (NaN kept NaN).
void small_batch_statistics(const SmallSums& sums, const std::vector<double>& K, const Geometry& g, Statistics& st) {
  const double inv_count = 1.0 / (static_cast<double>(g.N) * g.M);
  st.mu.resize(g.C);
  st.var.resize(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const double shifted_mean = sums.z[c] * inv_count;
    const double var = sums.zz[c] * inv_count - shifted_mean * shifted_mean;
    st.mu[c] = K[c] + shifted_mean;
    st.var[c] = var < 0 ? 0.0 : var;
  }
}

// The small path's training statistics (its forward's read of x): the batch statistics and the sample scales
// r_n into st, refusing a finite sample whose sum of squares overflows.
template <typename scalar_t>
void small_training_statistics(const Tensor& x, const Geometry& g, double target, double l2_eps, Statistics& st) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const std::vector<double> K = first_sample_shift(xp, g, target, l2_eps);
  SmallSums sums = small_sums<scalar_t, false>(xp, nullptr, g, K, target, l2_eps);
  check_no_overflow(x, sums.squares);
  small_batch_statistics(sums, K, g, st);
  st.scale = std::move(sums.scale);
}

template <typename scalar_t>
void small_forward(const Tensor& x, Tensor& y, const Geometry& g, const std::vector<double>& w,
                   const std::vector<double>& b, const std::optional<Tensor>& running_mean,
                   const std::optional<Tensor>& running_var, bool training, double momentum, double eps,
                   double l2_eps, bool rescale) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const double target = target_norm(g, rescale);
  Statistics st;
  std::vector<double> gain, shift;
  if (!training) {
    use_running_statistics(st, running_mean, running_var, g.C);
    channel_affine(st, w, b, eps, gain, shift);
    std::vector<double> scale(g.N), squares(g.N);
    small_output(xp, yp, g, gain, shift, scale, &squares, target, l2_eps);
    check_no_overflow(x, squares);  // y is discarded when this refuses
    return;
  }
  small_training_statistics<scalar_t>(x, g, target, l2_eps, st);
  channel_affine(st, w, b, eps, gain, shift);
  small_output(xp, yp, g, gain, shift, st.scale, nullptr, target, l2_eps);
  update_running_stats(running_mean, running_var, st, static_cast<double>(g.N * g.M), momentum);
}

// The small path's dz = A_c dy + r_n B_c x + E_c: A = γ·invstd and, with batch statistics over `count` values,
// B = −A·invstd·Σdy·ẑ / count and E = A·(invstd·μ·Σdy·ẑ − Σdy) / count (zeros for fixed ones: `count` 0).
struct SmallTerms {
  std::vector<double> A, B, E;
};

SmallTerms small_gradient_terms(const std::vector<double>& w, const std::vector<double>& invstd,
                                const std::vector<double>& mu, const std::vector<double>& grad_w,
                                const std::vector<double>& grad_b, double count) {
  const size_t C = w.size();
  SmallTerms t{std::vector<double>(C), std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  const double inv_count = count == 0 ? 0.0 : 1.0 / count;
  for (size_t c = 0; c < C; ++c) {
    t.A[c] = w[c] * invstd[c];
    if (count != 0) {
      t.B[c] = -t.A[c] * invstd[c] * grad_w[c] * inv_count;
      t.E[c] = t.A[c] * (invstd[c] * mu[c] * grad_w[c] - grad_b[c]) * inv_count;
    }
  }
  return t;
}

// Channels-last samples of at least kSampleSumsMinM positions keep per-sample sums in the backward's read, so
// that the input gradient is one pass, where those sums (3·C values) fit in kSampleSumsBytes beside the batch
// sums in L1 (docs/performance.md, session 18: faster at 4×4 and C ≤ 512; slower at 2×2, 3×3 and C = 1024).
constexpr int64_t kSampleSumsMinM = kSmallM;  // 4×4 maps (at 3×3 no faster)
constexpr int64_t kSampleSumsBytes = 6 * 1024;

template <typename acc_t>
bool keeps_sample_sums(const Geometry& g) {
  return g.channels_last && g.M >= kSampleSumsMinM &&
         3 * g.C * static_cast<int64_t>(sizeof(acc_t)) <= kSampleSumsBytes;
}

// Input gradient into dx; Σ dy·ẑ and Σ dy per channel into grad_w, grad_b.
template <typename scalar_t>
void small_backward(const Tensor& dy, const Tensor& x, Tensor& dx, const Geometry& g, const std::vector<double>& w,
                    const Tensor& running_mean, const Tensor& running_var, bool training, double eps, double l2_eps,
                    bool rescale, std::vector<double>& grad_w, std::vector<double>& grad_b) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const double target = target_norm(g, rescale);
  Statistics st;
  std::vector<double> K;
  if (training) {
    K = first_sample_shift(xp, g, target, l2_eps);
  } else {
    use_running_statistics(st, running_mean, running_var, g.C);
    K = st.mu;
  }
  const bool per_sample = keeps_sample_sums<at::opmath_type<scalar_t>>(g);
  std::vector<at::opmath_type<scalar_t>> sample_sums(per_sample ? g.N * 3 * g.C : 0);
  const SmallSums sums =
      per_sample ? small_sums<scalar_t, true, true>(xp, dy.const_data_ptr<scalar_t>(), g, K, target, l2_eps,
                                                    sample_sums.data())
                 : small_sums<scalar_t, true>(xp, dy.const_data_ptr<scalar_t>(), g, K, target, l2_eps);
  if (training) small_batch_statistics(sums, K, g, st);
  std::vector<double> invstd(g.C);
  grad_w.resize(g.C);
  grad_b.resize(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    invstd[c] = 1.0 / std::sqrt(st.var[c] + eps);
    grad_b[c] = sums.g[c];
    grad_w[c] = invstd[c] * (sums.gz[c] - (st.mu[c] - K[c]) * sums.g[c]);
  }
  const SmallTerms t = small_gradient_terms(w, invstd, st.mu, grad_w, grad_b,
                                            training ? static_cast<double>(g.N) * g.M : 0.0);
  small_input_grad(dy.const_data_ptr<scalar_t>(), xp, dx.mutable_data_ptr<scalar_t>(), g, t.A, t.B, t.E, sums,
                   l2_eps, per_sample ? sample_sums.data() : nullptr);
}

// ---------------------------------------------------------------------------------------------------
// Forward and backward
// ---------------------------------------------------------------------------------------------------

// Eval pass 1, channels-last sample: y = x·gain_c over the flat sample in chunks of kChunk values (the gain
// tiled, so a chunk starting at position p reads it contiguously from p % C); returns Σ x² (a float sum per
// chunk, added in float64).
template <typename scalar_t>
double scaled_flat(const scalar_t* __restrict__ xs, scalar_t* __restrict__ ys, const scalar_t* tiled_gain,
                   int64_t C, int64_t D) {
  using V = Vec<scalar_t>;
  constexpr int64_t kLanes = V::kLanes;
  double total = 0;
  for (int64_t start = 0; start < D; start += kChunk) {
    const int64_t len = std::min(D, start + kChunk) - start;
    const scalar_t* __restrict__ xc = xs + start;
    scalar_t* __restrict__ yc = ys + start;
    const scalar_t* __restrict__ gv = tiled_gain + start % C;
    typename V::type a = {}, b = {};  // two accumulators: one is an FMA's latency a vector
    int64_t i = 0;
    for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
      const auto u = V::load(xc + i), v = V::load(xc + i + kLanes);
      a += u * u;
      b += v * v;
      V::store(yc + i, u * V::load(gv + i));
      V::store(yc + i + kLanes, v * V::load(gv + i + kLanes));
    }
    scalar_t part = V::lane_sum(a + b);
    for (; i < len; ++i) {
      part += xc[i] * xc[i];
      yc[i] = xc[i] * gv[i];
    }
    total += part;
  }
  return total;
}

// Eval pass 1, rows-layout sample: y = x·gain_c row by row; returns Σ x², summed in two vectors
// carried across the rows (a reduction loop per row ends in a horizontal sum, which at 8×8 costs about as much
// as the row) and added in float64 every kChunk values a vector pair.
template <typename scalar_t>
double scaled_rows(const scalar_t* __restrict__ xs, scalar_t* __restrict__ ys, const scalar_t* gain, int64_t C,
                   int64_t M) {
  using V = Vec<scalar_t>;
  constexpr int64_t kLanes = V::kLanes;
  const int64_t body = M - M % (2 * kLanes);
  typename V::type a = {}, b = {};
  double total = 0, tail = 0;
  for (int64_t c = 0, since = 0; c < C; ++c) {
    const scalar_t* __restrict__ xr = xs + c * M;
    scalar_t* __restrict__ yr = ys + c * M;
    const scalar_t gv = gain[c];
    for (int64_t i = 0; i < body; i += 2 * kLanes) {
      const auto u = V::load(xr + i), v = V::load(xr + i + kLanes);
      a += u * u;
      b += v * v;
      V::store(yr + i, u * gv);
      V::store(yr + i + kLanes, v * gv);
    }
    for (int64_t i = body; i < M; ++i) {
      tail += static_cast<double>(xr[i]) * xr[i];
      yr[i] = xr[i] * gv;
    }
    since += body;
    if (since >= 2 * kChunk || c + 1 == C) {
      total += V::lane_sum(a + b);
      a = typename V::type{};
      b = typename V::type{};
      since = 0;
    }
  }
  return total + tail;
}

// Per-channel values in scalar_t, for eval_streamed's sweeps: channels-last, tiled (entry t for channel t % C)
// so that a chunk of kChunk values starting at position p reads them contiguously from p % C. (eval_in_cache
// builds its own: through this function its loops measured ~10 % slower at four shapes in 8×8–32×32, three
// blocks each, in the same process — a difference of generated code, not of the values.)
template <typename scalar_t>
std::vector<scalar_t> tiled(const std::vector<double>& values, const Geometry& g) {
  const int64_t span = g.channels_last ? g.C + std::min(kChunk, g.C * g.M) : g.C;
  std::vector<scalar_t> out(span);
  for (int64_t t = 0; t < span; ++t) out[t] = static_cast<scalar_t>(values[t % g.C]);
  return out;
}

// Eval pass 2: y[i] = y[i]·r + s[i] in place, with s per value (kTiled) or one value (s[0]); two vectors a
// step. (As an omp simd loop, one vector a step with its peeling code, this sweep took 10–15 % more of the
// eval's time in some builds than in others: a one-vector loop's speed here follows where it lands in the
// code, 32-byte fetch windows.)
template <typename scalar_t, bool kTiled>
void rescale_in_place(scalar_t* __restrict__ y, const scalar_t* __restrict__ s, scalar_t r, int64_t len) {
  using V = Vec<scalar_t>;
  constexpr int64_t kLanes = V::kLanes;
  typename V::type sv;
  for (int64_t l = 0; l < kLanes; ++l) sv[l] = s[0];
  int64_t i = 0;
  for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
    const auto a = V::load(y + i), b = V::load(y + i + kLanes);
    V::store(y + i, a * r + (kTiled ? V::load(s + i) : sv));
    V::store(y + i + kLanes, b * r + (kTiled ? V::load(s + i + kLanes) : sv));
  }
  for (; i + kLanes <= len; i += kLanes) V::store(y + i, V::load(y + i) * r + (kTiled ? V::load(s + i) : sv));
  for (; i < len; ++i) y[i] = y[i] * r + s[kTiled ? i : 0];
}

// Eval of samples n0..n1 in float32/float64 (rows layout: runs of at least kInCacheRun values): per sample,
// one pass reads x, writes x·gain_c to y and sums ‖x_n‖² (float chunks of at most kChunk values added in
// float64); a second pass turns y into y·r_n + shift_c in place while the sample is still in cache. The
// memory traffic is then BatchNorm's, one read of x and one write of y (samples under kInCacheBytes, and
// shorter runs, measured no faster than with the per-sample path). Channels-last samples are swept
// flat, in chunks, with the per-channel values tiled (entry t for channel t % C) so that a chunk starting
// at position p reads them contiguously from p % C.
template <typename scalar_t>
void eval_in_cache(const scalar_t* xp, scalar_t* yp, const Geometry& g, const std::vector<double>& gain,
                   const std::vector<double>& shift, double target, double l2_eps, std::vector<double>& squares,
                   int64_t n0, int64_t n1) {
  const int64_t C = g.C, M = g.M, D = C * M;
  const int64_t run = g.channels_last ? D : M;  // values with a per-channel pattern of their own
  const int64_t span = g.channels_last ? C + std::min(kChunk, D) : C;
  std::vector<scalar_t> gc(span), sc(span);
  for (int64_t t = 0; t < span; ++t) {
    gc[t] = t < C ? static_cast<scalar_t>(gain[t]) : gc[t - C];
    sc[t] = t < C ? static_cast<scalar_t>(shift[t]) : sc[t - C];
  }
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* __restrict__ xs = xp + n * D;
    scalar_t* __restrict__ ys = yp + n * D;
    const double total = g.channels_last ? scaled_flat(xs, ys, gc.data(), C, D) : scaled_rows(xs, ys, gc.data(), C, M);
    squares[n] = total;
    const scalar_t rn = static_cast<scalar_t>(sample_scale(total, target, l2_eps));
    for (int64_t r = 0; r < D / run; ++r) {
      for (int64_t start = r * run, stop = start + run; start < stop; start += kChunk) {
        const int64_t len = std::min(stop, start + kChunk) - start;
        if (g.channels_last)
          rescale_in_place<scalar_t, true>(ys + start, sc.data() + start % C, rn, len);
        else
          rescale_in_place<scalar_t, false>(ys + start, &sc[r], rn, len);
      }
    }
  }
}

// y[i] = (x[i]·g[i])·r + s[i] for i < len, with g and s per value (kTiled) or one value each (g[0], s[0]),
// stored past the caches. The arithmetic is eval_in_cache's, (x·gain)·r + shift: both paths give the same
// values for the same r.
template <typename scalar_t, bool kTiled>
void streamed_affine(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const scalar_t* __restrict__ g,
                     const scalar_t* __restrict__ s, scalar_t r, int64_t len) {
  using V = Vec<scalar_t>;
  typename V::type gv, sv;
  for (int64_t l = 0; l < V::kLanes; ++l) gv[l] = g[0], sv[l] = s[0];
  store_streamed(
      y, len, [&](int64_t i) { return (x[i] * g[kTiled ? i : 0]) * r + s[kTiled ? i : 0]; },
      [&](int64_t i) {
        return kTiled ? (V::load(x + i) * V::load(g + i)) * r + V::load(s + i) : (V::load(x + i) * gv) * r + sv;
      });
}

// Σ x² of each of the N samples of D values, a sample a thread; with fewer samples than threads (where that would
// leave threads idle) each sample split into one piece a thread, pieces of at least at::internal::GRAIN_SIZE
// values (torch's own threshold for a parallel loop: below it, waking a thread costs more than it saves).
template <typename scalar_t>
std::vector<double> sample_squares(const scalar_t* xp, int64_t N, int64_t D) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t pieces = N < threads ? std::clamp<int64_t>(D / at::internal::GRAIN_SIZE, 1, threads) : 1;
  const int64_t piece = (D + pieces - 1) / pieces;
  std::vector<double> partial(N * pieces, 0.0), squares(N, 0.0);
  at::parallel_for(0, N * pieces, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / pieces, start = std::min(D, (i % pieces) * piece);
      partial[i] = squares_of(xp + n * D + start, std::min(D, start + piece) - start);
    }
  });
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < pieces; ++p) squares[n] += partial[n * pieces + p];
  return squares;
}

// Eval of samples n0..n1 in float32/float64 for outputs larger than the caches: per sample, ‖x_n‖ in one read
// of x, then y = (x·gain_c)·r_n + shift_c from x still in cache, y stored past the caches.
template <typename scalar_t>
void eval_streamed(const scalar_t* xp, scalar_t* yp, const Geometry& g, const std::vector<double>& gain,
                   const std::vector<double>& shift, double target, double l2_eps, std::vector<double>& squares,
                   int64_t n0, int64_t n1) {
  const int64_t C = g.C, M = g.M, D = C * M;
  const std::vector<scalar_t> gc = tiled<scalar_t>(gain, g), sc = tiled<scalar_t>(shift, g);
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* __restrict__ xs = xp + n * D;
    scalar_t* __restrict__ ys = yp + n * D;
    squares[n] = squares_of(xs, D);
    const scalar_t rn = static_cast<scalar_t>(sample_scale(squares[n], target, l2_eps));
    if (g.channels_last) {
      for (int64_t start = 0; start < D; start += kChunk) {
        const int64_t len = std::min(D, start + kChunk) - start;
        streamed_affine<scalar_t, true>(xs + start, ys + start, gc.data() + start % C, sc.data() + start % C, rn, len);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) streamed_affine<scalar_t, false>(xs + c * M, ys + c * M, &gc[c], &sc[c], rn, M);
    }
  }
  stream_fence();
}

// Eval: per sample, ‖x_n‖ then the output, while the sample is still in cache (one read from memory).
template <typename scalar_t>
void eval_forward(const Tensor& x, Tensor& y, const Geometry& g, const std::vector<double>& gain,
                  const std::vector<double>& shift, double target, double l2_eps) {
  const int64_t D = g.C * g.M;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  Coefficients k = output_coefficients(std::vector<double>(g.N), gain, shift);
  AffinePass<scalar_t, false> pass{xp, nullptr, y.mutable_data_ptr<scalar_t>(), g, k, past_the_caches(y, 2)};
  std::vector<double> squares(g.N, 0.0);
  if (g.N >= at::get_num_threads()) {
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {  // float, double: x·gain_c kept exactly enough
        if ((g.channels_last || g.M >= kInCacheRun) && D * static_cast<int64_t>(sizeof(scalar_t)) >= kInCacheBytes) {
          scalar_t* yp = y.mutable_data_ptr<scalar_t>();
          if (pass.stream) {
            eval_streamed(xp, yp, g, gain, shift, target, l2_eps, squares, n0, n1);
          } else {
            eval_in_cache(xp, yp, g, gain, shift, target, l2_eps, squares, n0, n1);
          }
          return;
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        squares[n] = squares_of(xp + n * D, D);
        k.alpha[n] = sample_scale(squares[n], target, l2_eps);
        pass.samples(n, n + 1);
      }
    });
    check_no_overflow(x, squares);  // y is discarded when this refuses
    return;
  }
  // Fewer samples than threads: split each sample's norm, then the output pass over all threads.
  squares = sample_squares(xp, g.N, D);
  for (int64_t n = 0; n < g.N; ++n) k.alpha[n] = sample_scale(squares[n], target, l2_eps);
  check_no_overflow(x, squares);
  pass.all();
}

Tensor l2bn_forward(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
                    double momentum, double eps, double l2_eps, bool rescale) {
  const Tensor x = dense(input);
  const Geometry g = geometry(x);
  const std::vector<double> w = to_vector(weight, g.C, 1.0), b = to_vector(bias, g.C, 0.0);
  Tensor y = at::empty_like(x);
  if (small_spatial(g, training)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_small_forward", [&] {
      small_forward<scalar_t>(x, y, g, w, b, running_mean, running_var, training, momentum, eps, l2_eps, rescale);
    });
    return y;
  }
  std::vector<double> gain, shift;
  if (!training) {
    Statistics st;
    use_running_statistics(st, running_mean, running_var, g.C);
    channel_affine(st, w, b, eps, gain, shift);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_eval", [&] {
      eval_forward<scalar_t>(x, y, g, gain, shift, target_norm(g, rescale), l2_eps);
    });
    return y;
  }
  const Statistics st = statistics(moments<false>(x, nullptr, g), g, rescale, l2_eps, true);
  check_no_overflow(x, st.norm);
  channel_affine(st, w, b, eps, gain, shift);
  const Coefficients k = output_coefficients(st.scale, gain, shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_forward", [&] {
    AffinePass<scalar_t, false>{x.const_data_ptr<scalar_t>(), nullptr, y.mutable_data_ptr<scalar_t>(), g, k,
                                past_the_caches(y, 2)}
        .all();
  });
  update_running_stats(running_mean, running_var, st, static_cast<double>(g.N * g.M), momentum);
  return y;
}

struct Gradients {
  Tensor input, weight, bias;
};

// A (C,) tensor of `dtype` holding `values` (a parameter's gradient, summed in float64), in one allocation.
Tensor channel_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l2bn_channel_tensor", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i)
      p[i] = static_cast<scalar_t>(static_cast<at::opmath_type<scalar_t>>(values[i]));
  });
  return t;
}

// The weight's and bias's gradients as tensors: the weight's in its dtype (if it is defined), the bias's in
// `bias_dtype` (if there is a bias).
void parameter_gradients(Gradients& out, const std::vector<double>& grad_w, const std::vector<double>& grad_b,
                         const Tensor& weight, std::optional<at::ScalarType> bias_dtype) {
  if (weight.defined()) out.weight = channel_tensor(grad_w, weight.scalar_type());
  if (bias_dtype) out.bias = channel_tensor(grad_b, *bias_dtype);
}

// Σ dy and Σ dy·ẑ per channel, with ẑ = (r_n x − μ)·invstd and r_n·m − μ the (n, c) mean of z − μ; every
// channel summed in n order.
void channel_gradient_sums(const Moments& mo, const Statistics& st, const std::vector<double>& invstd,
                           const Geometry& g, std::vector<double>& grad_w, std::vector<double>& grad_b) {
  const int64_t N = g.N, C = g.C;
  grad_w.assign(C, 0.0);
  grad_b.assign(C, 0.0);
  at::parallel_for(0, C, algebra_grain(N), [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      const double r = st.scale[n];
      const double *mean = mo.mean + n * C, *dsum = mo.grad_sum + n * C, *dot = mo.grad_dot + n * C;
      for (int64_t c = c0; c < c1; ++c) {
        grad_b[c] += dsum[c];
        grad_w[c] += r * dot[c] + (r * mean[c] - st.mu[c]) * dsum[c];
      }
    }
    for (int64_t c = c0; c < c1; ++c) grad_w[c] *= invstd[c];
  });
}

// With batch statistics dz = gain·(dy − Σdy/count − ẑ·Σdy·ẑ/count): k_c = gain·invstd·Σdy·ẑ/count and
// mean_dz_c = gain·Σdy/count; with fixed ones (count 0) dz = gain·dy, both zero.
struct BatchTerms {
  std::vector<double> k, mean_dz;
};

BatchTerms batch_terms(const std::vector<double>& gain, const std::vector<double>& invstd,
                       const std::vector<double>& grad_w, const std::vector<double>& grad_b, double count) {
  const size_t C = gain.size();
  BatchTerms t{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  if (count == 0) return t;
  const double inv_count = 1.0 / count;
  for (size_t c = 0; c < C; ++c) {
    t.k[c] = gain[c] * invstd[c] * grad_w[c] * inv_count;
    t.mean_dz[c] = gain[c] * grad_b[c] * inv_count;
  }
  return t;
}

// The l2 step dx = r_n (dz − x·T_n / ‖x_n‖²) with T_n = Σ dz·x (nothing where the norm was clamped), as one pass:
// dx = dy·r_n gain_c + x·(−r_n² k_c − r_n u_n) + r_n (k_c μ_c − mean_dz_c), u_n = T_n / ‖x_n‖².
void input_gradient_pass(const Tensor& dy, const Tensor& x, Tensor& dx, const Moments& mo, const Statistics& st,
                         const std::vector<double>& gain, const BatchTerms& terms, const Geometry& g, double l2_eps) {
  const int64_t N = g.N, C = g.C, M = g.M;
  const std::vector<double>&k = terms.k, &mean_dz = terms.mean_dz;
  Coefficients coef;
  coef.alpha = st.scale;
  coef.sigma = st.scale;
  coef.beta.resize(N);
  coef.delta.resize(N);
  coef.a = gain;
  coef.b.resize(C);
  coef.s.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    coef.b[c] = -k[c];
    coef.s[c] = k[c] * st.mu[c] - mean_dz[c];
  }
  at::parallel_for(0, N, algebra_grain(C), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const double r = st.scale[n];
      const double *mean = mo.mean + n * C, *sumsq = mo.sumsq + n * C;
      const double *dsum = mo.grad_sum + n * C, *dot = mo.grad_dot + n * C;
      double t = 0;  // T_n = Σ_c Σ_S dz·x = Σ_c (Σ dz·(x − m) + m Σ dz)
      for (int64_t c = 0; c < C; ++c) {
        const double dz_sum = gain[c] * dsum[c] - M * (mean_dz[c] + k[c] * (r * mean[c] - st.mu[c]));
        const double dz_dot = gain[c] * dot[c] - k[c] * r * sumsq[c];
        t += dz_dot + mean[c] * dz_sum;
      }
      const double u = st.norm[n] <= l2_eps ? 0.0 : t / (st.norm[n] * st.norm[n]);  // NaN norm: NaN, as elsewhere
      coef.beta[n] = r * r;
      coef.delta[n] = -r * u;
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_backward", [&] {
    AffinePass<scalar_t, true>{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                               dx.mutable_data_ptr<scalar_t>(), g, coef, past_the_caches(dx, 3)}
        .all();
  });
}

// Backward of L2BN; with training=false the statistics are the fixed running ones.
Gradients l2bn_backward(const Tensor& grad_out, const Tensor& input, const Tensor& weight, const Tensor& running_mean,
                        const Tensor& running_var, bool training, double eps, double l2_eps, bool rescale,
                        std::optional<at::ScalarType> bias_dtype) {
  const Tensor x = dense(input);
  const Tensor dy = like(grad_out, x);
  const Geometry g = geometry(x);
  const int64_t N = g.N, C = g.C, M = g.M;
  Gradients out;
  out.input = at::empty_like(x);
  if (small_spatial(g, training)) {
    std::vector<double> grad_w, grad_b;
    const std::vector<double> w = to_vector(weight, C, 1.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_small_backward", [&] {
      small_backward<scalar_t>(dy, x, out.input, g, w, running_mean, running_var, training, eps, l2_eps, rescale,
                               grad_w, grad_b);
    });
    parameter_gradients(out, grad_w, grad_b, weight, bias_dtype);
    return out;
  }
  // Per (n, c), in one read of (x, dy): m, q = Σ (x − m)², Σ dy and Σ dy·(x − m).
  const Moments mo = moments<true>(x, &dy, g);
  Statistics st = statistics(mo, g, rescale, l2_eps, training);
  if (!training) {
    use_running_statistics(st, running_mean, running_var, C);
  }
  const std::vector<double> w = to_vector(weight, C, 1.0);
  std::vector<double> invstd(C), gain(C), grad_w, grad_b;
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = 1.0 / std::sqrt(st.var[c] + eps);
    gain[c] = w[c] * invstd[c];
  }
  channel_gradient_sums(mo, st, invstd, g, grad_w, grad_b);
  const BatchTerms terms = batch_terms(gain, invstd, grad_w, grad_b, training ? static_cast<double>(N * M) : 0.0);
  input_gradient_pass(dy, x, out.input, mo, st, gain, terms, g, l2_eps);
  parameter_gradients(out, grad_w, grad_b, weight, bias_dtype);
  return out;
}

// The same gradients through ATen ops, for a dy that the raw loops above cannot read: a vmap-batched one
// (torch.autograd.grad(..., is_grads_batched=True), gradcheck's check_batched_grad), which has no storage.
// Every op below is out of place, so vmap's batching rules carry dy's hidden batch dimension through.
Gradients composite_backward(const Tensor& dy_in, const Tensor& x_in, const Tensor& weight, const Tensor& running_mean,
                             const Tensor& running_var, bool training, double eps, double l2_eps, bool rescale,
                             std::optional<at::ScalarType> bias_dtype) {
  const auto acc = at::promote_types(x_in.scalar_type(), at::kFloat);
  const Tensor x = x_in.to(acc), dy = dy_in.to(acc);
  const int64_t N = x.size(0), C = x.size(1), dim = x.dim();
  std::vector<int64_t> channel_dims{0}, sample_dims{1}, per_channel(dim, 1), per_sample(dim, 1);
  for (int64_t d = 2; d < dim; ++d) {
    channel_dims.push_back(d);
    sample_dims.push_back(d);
  }
  per_channel[1] = C;
  per_sample[0] = N;
  const double count = static_cast<double>(x.numel() / C);
  const Tensor squares = x.square().sum(sample_dims), norm = squares.sqrt();
  const double target = rescale ? std::sqrt(static_cast<double>(x.numel() / N)) : 1.0;
  const Tensor r = (target / norm.clamp_min(l2_eps)).view(per_sample);
  const Tensor z = x * r;
  Tensor mu, var;
  if (training) {
    std::tie(var, mu) = at::var_mean(z, channel_dims, /*correction=*/0);
  } else {
    mu = running_mean.to(acc);
    var = running_var.to(acc);
  }
  const Tensor invstd = (var + eps).rsqrt().view(per_channel);
  const Tensor zhat = (z - mu.view(per_channel)) * invstd;
  const Tensor gain = weight.defined() ? weight.to(acc).view(per_channel) * invstd : invstd;
  Gradients out;
  out.bias = dy.sum(channel_dims);
  out.weight = (dy * zhat).sum(channel_dims);
  Tensor dz = training ? dy - out.bias.view(per_channel) / count - zhat * (out.weight.view(per_channel) / count) : dy;
  dz = dz * gain;
  // through z = r_n x with r_n = target / ‖x_n‖: dx = r_n (dz − x Σ(dz·x) / ‖x_n‖²), nothing where the norm was clamped
  const Tensor u = at::where(norm <= l2_eps, at::zeros_like(norm), (dz * x).sum(sample_dims) / squares);
  out.input = (r * (dz - x * u.view(per_sample))).to(x_in.scalar_type());
  if (weight.defined()) out.weight = out.weight.to(weight.scalar_type());
  else out.weight = Tensor();
  out.bias = bias_dtype ? out.bias.to(*bias_dtype) : Tensor();
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Synchronized L2BN (kernels/cpp_sync.py): the general path's passes, split where the caller all-reduces the
// channel sums across ranks — forward: sync_local_sums, [all-reduce], sync_output; backward:
// sync_gradient_sums, [all-reduce], sync_input_gradient. Statistics and sums are float64 throughout.
// ---------------------------------------------------------------------------------------------------

Tensor float64_tensor(const std::vector<double>& values) {
  return channel_tensor(values, at::kDouble);
}

// This rank's [N·M, Σz per channel, Σz² per channel] of z = r_n x (1 + 2C float64) and r_n (N float64), in one
// read of x: on the small-spatial path from its shifted sums (Σz = Σ(z − K) + count·K, Σz² = Σ(z − K)² +
// 2K·Σ(z − K) + count·K²), else from the per-(n, c) moments' pooled statistics (Σz² = count·(σ² + μ²)).
// Refuses a finite sample whose norm overflows (the caller reruns it rescaled), before any collective.
std::tuple<Tensor, Tensor> sync_local_sums(const Tensor& input, double l2_eps, bool rescale) {
  TORCH_CHECK(input.dim() >= 2 && input.size(0) > 0, "sync_local_sums expects (N, C, *) input with N > 0");
  const Tensor x = dense(input);
  const Geometry g = geometry(x);
  const double count = static_cast<double>(g.N * g.M), target = target_norm(g, rescale);
  std::vector<double> sums(1 + 2 * g.C), scale;
  sums[0] = count;
  if (small_spatial(g, true)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_sync_small_sums", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const std::vector<double> K = first_sample_shift(xp, g, target, l2_eps);
      SmallSums shifted = small_sums<scalar_t, false>(xp, nullptr, g, K, target, l2_eps);
      check_no_overflow(x, shifted.squares);
      for (int64_t c = 0; c < g.C; ++c) {
        sums[1 + c] = shifted.z[c] + count * K[c];
        sums[1 + g.C + c] = shifted.zz[c] + 2 * K[c] * shifted.z[c] + count * K[c] * K[c];
      }
      scale = std::move(shifted.scale);
    });
  } else {
    Statistics st = statistics(moments<false>(x, nullptr, g), g, rescale, l2_eps, true);
    check_no_overflow(x, st.norm);
    for (int64_t c = 0; c < g.C; ++c) {
      sums[1 + c] = count * st.mu[c];
      sums[1 + g.C + c] = count * (st.var[c] + st.mu[c] * st.mu[c]);
    }
    scale = std::move(st.scale);
  }
  return {float64_tensor(sums), float64_tensor(scale)};
}

// μ_c = Σz / count and σ²_c = Σz² / count − μ_c² (at least 0) from all ranks' sums.
Statistics synced_statistics(const Tensor& sums, int64_t C) {
  const Tensor s = sums.contiguous();
  const double* p = s.const_data_ptr<double>();
  const double values = std::max(p[0], 1.0);
  Statistics st;
  st.mu.resize(C);
  st.var.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    st.mu[c] = p[1 + c] / values;
    st.var[c] = std::max(p[1 + C + c] / values - st.mu[c] * st.mu[c], 0.0);
  }
  return st;
}

// The output from all ranks' sums (and this rank's r_n); the running statistics updated with the global count.
// Returns (y, μ, invstd), the last two (C,) float64.
std::tuple<Tensor, Tensor, Tensor> sync_output(const Tensor& input, const std::optional<Tensor>& weight,
                                               const std::optional<Tensor>& bias,
                                               const std::optional<Tensor>& running_mean,
                                               const std::optional<Tensor>& running_var, const Tensor& sums,
                                               const Tensor& scale, double momentum, double eps) {
  const Tensor x = dense(input);
  const Geometry g = geometry(x);
  Statistics st = synced_statistics(sums, g.C);
  st.scale = to_vector(scale, g.N, 0.0);
  std::vector<double> gain, shift, invstd(g.C);
  channel_affine(st, to_vector(weight, g.C, 1.0), to_vector(bias, g.C, 0.0), eps, gain, shift);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_sync_output", [&] {
    if (small_spatial(g, true)) {
      small_output(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, gain, shift, st.scale, nullptr,
                   0.0, 0.0);
    } else {
      AffinePass<scalar_t, false>{x.const_data_ptr<scalar_t>(), nullptr, y.mutable_data_ptr<scalar_t>(), g,
                                  output_coefficients(st.scale, gain, shift), past_the_caches(y, 2)}
          .all();
    }
  });
  update_running_stats(running_mean, running_var, st, sums[0].item<double>(), momentum);
  for (int64_t c = 0; c < g.C; ++c) invstd[c] = 1.0 / std::sqrt(st.var[c] + eps);
  return {y, float64_tensor(st.mu), float64_tensor(invstd)};
}

// The general path's moments in a (4, N, C) workspace (read only).
Moments workspace_view(const Tensor& workspace, const Geometry& g) {
  double* p = const_cast<double*>(workspace.const_data_ptr<double>());
  const int64_t NC = g.N * g.C;
  return {p, p + NC, p + 2 * NC, p + 3 * NC};
}

// Backward's statistics: this rank's r_n and ‖x_n‖ from the moments, the global μ (the passes read no σ²: they
// take invstd as it is).
Statistics backward_statistics(const Moments& mo, const Geometry& g, const Tensor& mean, double l2_eps, bool rescale) {
  Statistics st = statistics(mo, g, rescale, l2_eps, false);
  st.mu = to_vector(mean, g.C, 0.0);
  return st;
}

// Backward, first half, in one read of (x, dy): this rank's [Σ dy, Σ dy·ẑ] per channel (2C float64, ẑ with the
// global μ and invstd) and a workspace for sync_input_gradient — the small-spatial path's ‖x_n‖² and r_n (2N
// float64; its shifted sums taken about μ, so Σ dy·(z − μ) directly), else the per-(n, c) moments ((4, N, C)).
std::tuple<Tensor, Tensor> sync_gradient_sums(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                              const Tensor& invstd, double l2_eps, bool rescale) {
  const Tensor x = dense(input), dy = like(grad_out, x);
  const Geometry g = geometry(x);
  const std::vector<double> inv = to_vector(invstd, g.C, 1.0);
  std::vector<double> grad_w(g.C), grad_b(g.C);
  Tensor workspace;
  if (small_spatial(g, true)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_sync_small_grad", [&] {
      SmallSums s = small_sums<scalar_t, true>(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), g,
                                               to_vector(mean, g.C, 0.0), target_norm(g, rescale), l2_eps);
      for (int64_t c = 0; c < g.C; ++c) {
        grad_b[c] = s.g[c];
        grad_w[c] = inv[c] * s.gz[c];
      }
      s.squares.insert(s.squares.end(), s.scale.begin(), s.scale.end());
      workspace = float64_tensor(s.squares);
    });
  } else {
    workspace = at::empty({4, g.N, g.C}, at::TensorOptions().dtype(at::kDouble));
    const Moments mo = moments<true>(x, &dy, g, workspace.mutable_data_ptr<double>());
    channel_gradient_sums(mo, backward_statistics(mo, g, mean, l2_eps, rescale), inv, g, grad_w, grad_b);
  }
  grad_b.insert(grad_b.end(), grad_w.begin(), grad_w.end());
  return {float64_tensor(grad_b), workspace};
}

// Backward, second half: dx from sync_gradient_sums' workspace, all ranks' [Σ dy, Σ dy·ẑ] and the global count.
Tensor sync_input_gradient(const Tensor& grad_out, const Tensor& input, const std::optional<Tensor>& weight,
                           const Tensor& workspace, const Tensor& mean, const Tensor& invstd, const Tensor& sums,
                           double count, double l2_eps, bool rescale) {
  const Tensor x = dense(input), dy = like(grad_out, x);
  const Geometry g = geometry(x);
  const std::vector<double> w = to_vector(weight, g.C, 1.0), inv = to_vector(invstd, g.C, 1.0);
  const std::vector<double> mu = to_vector(mean, g.C, 0.0), total = to_vector(sums, 2 * g.C, 0.0);
  const std::vector<double> grad_b(total.begin(), total.begin() + g.C), grad_w(total.begin() + g.C, total.end());
  Tensor dx = at::empty_like(x);
  if (small_spatial(g, true)) {
    const std::vector<double> saved = to_vector(workspace, 2 * g.N, 0.0);
    SmallSums s;
    s.squares.assign(saved.begin(), saved.begin() + g.N);
    s.scale.assign(saved.begin() + g.N, saved.end());
    const SmallTerms t = small_gradient_terms(w, inv, mu, grad_w, grad_b, count);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_sync_small_dx", [&] {
      small_input_grad(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                       g, t.A, t.B, t.E, s, l2_eps);
    });
    return dx;
  }
  const Moments mo = workspace_view(workspace, g);
  const Statistics st = backward_statistics(mo, g, mean, l2_eps, rescale);
  std::vector<double> gain(g.C);
  for (int64_t c = 0; c < g.C; ++c) gain[c] = w[c] * inv[c];
  input_gradient_pass(dy, x, dx, mo, st, gain, batch_terms(gain, inv, grad_w, grad_b, count), g, l2_eps);
  return dx;
}

// ---------------------------------------------------------------------------------------------------
// Autograd and registration
// ---------------------------------------------------------------------------------------------------

struct L2BatchNormFunction : public torch::autograd::Function<L2BatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, bool training, double momentum, double eps,
                        double l2_eps, bool rescale) {
    Tensor y = l2bn_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale);
    const Tensor none;
    ctx->save_for_backward({input, weight.value_or(none), training ? none : running_mean.value_or(none),
                            training ? none : running_var.value_or(none)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["l2_eps"] = l2_eps;
    ctx->saved_data["rescale"] = rescale;
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["bias_dtype"] = has_bias ? bias->scalar_type() : input.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& dy = grad_outputs[0];
    TORCH_CHECK(!at::GradMode::is_enabled() || !(dy.requires_grad() || saved[0].requires_grad() ||
                                                 (saved[1].defined() && saved[1].requires_grad())),
                "l2bn: the compiled CPU kernel has no double backward; use impl='reference'");
    const auto backward = dy.has_storage() ? l2bn_backward : composite_backward;  // no storage: vmap-batched
    std::optional<at::ScalarType> bias_dtype;
    if (ctx->saved_data["has_bias"].toBool()) bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
    Gradients grads = backward(dy, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["training"].toBool(),
                                 ctx->saved_data["eps"].toDouble(), ctx->saved_data["l2_eps"].toDouble(),
                                 ctx->saved_data["rescale"].toBool(), bias_dtype);
    const Tensor none;
    return {grads.input, grads.weight, grads.bias, none, none, none, none, none, none, none};
  }
};

}  // namespace

Tensor l2_batch_norm_cpu(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                         bool training, double momentum, double eps, double l2_eps, bool rescale) {
  TORCH_CHECK(input.device().is_cpu(), "l2bn's compiled kernel runs on the CPU, got input on ", input.device());
  TORCH_CHECK(input.dim() >= 2 && input.numel() > 0, "l2bn's compiled kernel expects non-empty (N, C, *) input");
  // Nothing to differentiate (no_grad, inference, or no input requiring a gradient; no forward-mode tangent,
  // which the autograd function refuses): the kernel alone, without building an autograd node.
  const auto tracked = [](const std::optional<Tensor>& t) {
    return t.has_value() && t->defined() && (t->requires_grad() && at::GradMode::is_enabled());
  };
  const auto tangent = [](const std::optional<Tensor>& t) { return torch::autograd::isFwGradDefined(t); };
  if (!tracked(input) && !tracked(weight) && !tracked(bias) && !tangent(input) && !tangent(weight) && !tangent(bias))
    return l2bn_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale);
  return L2BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps,
                                    rescale);
}

// The backward as an operator of its own, for the custom op torch.compile keeps in its graphs
// (kernels/cpp_custom_op.py registers its autograd formula in Python): the input, weight and bias gradients (the
// last two undefined without a weight or a bias dtype). The running statistics are read in eval only.
std::tuple<Tensor, Tensor, Tensor> l2_batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                          const std::optional<Tensor>& weight,
                                                          const std::optional<Tensor>& running_mean,
                                                          const std::optional<Tensor>& running_var, bool training,
                                                          double eps, double l2_eps, bool rescale,
                                                          std::optional<at::ScalarType> bias_dtype) {
  TORCH_CHECK(input.device().is_cpu(), "l2bn's compiled kernel runs on the CPU, got input on ", input.device());
  const Tensor none;
  Gradients g = l2bn_backward(grad_out, input, weight.value_or(none), running_mean.value_or(none),
                              running_var.value_or(none), training, eps, l2_eps, rescale, bias_dtype);
  return {g.input, g.weight, g.bias};
}

// The forward without its output pass, for compiled graphs (kernels/cpp_custom_op.py): the statistics read of x
// (in eval, the sample norms; the channel statistics are the running ones) and, in training, the running statistics
// updated; returns the output's coefficients y = x·A[n,c] + S[c] (A = r_n·gain_c formed in float64 and rounded to
// the accumulation type once, as the output passes form them; S = shift_c), so that the compiler writes y in a
// pass fused with the ops after the layer. Refuses overflowing samples as the forward does, before anything is
// written.
std::tuple<Tensor, Tensor> l2_batch_norm_coefficients(const Tensor& input, const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const std::optional<Tensor>& running_mean,
                                                      const std::optional<Tensor>& running_var, bool training,
                                                      double momentum, double eps, double l2_eps, bool rescale) {
  TORCH_CHECK(input.device().is_cpu(), "l2bn's compiled kernel runs on the CPU, got input on ", input.device());
  TORCH_CHECK(input.dim() >= 2 && input.numel() > 0, "l2bn's compiled kernel expects non-empty (N, C, *) input");
  const Tensor x = dense(input);
  const Geometry g = geometry(x);
  const double target = target_norm(g, rescale);
  Statistics st;
  if (!training) {  // whole samples are contiguous in either layout
    use_running_statistics(st, running_mean, running_var, g.C);
    std::vector<double> squares(g.N);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_eval_coefficients", [&] {
      squares = sample_squares(x.const_data_ptr<scalar_t>(), g.N, g.C * g.M);  // as the eager eval sums them
    });
    st.scale.resize(g.N);
    for (int64_t n = 0; n < g.N; ++n) st.scale[n] = sample_scale(squares[n], target, l2_eps);
    check_no_overflow(x, squares);
  } else if (small_spatial(g, true)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_small_coefficients", [&] {
      small_training_statistics<scalar_t>(x, g, target, l2_eps, st);
    });
  } else {
    st = statistics(moments<false>(x, nullptr, g), g, rescale, l2_eps, true);
    check_no_overflow(x, st.norm);
  }
  std::vector<double> gain, shift;
  channel_affine(st, to_vector(weight, g.C, 1.0), to_vector(bias, g.C, 0.0), eps, gain, shift);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  Tensor scale = at::empty({g.N, g.C}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "l2bn_coefficients", [&] {
    scalar_t* a = scale.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N, algebra_grain(g.C), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t c = 0; c < g.C; ++c) a[n * g.C + c] = static_cast<scalar_t>(st.scale[n] * gain[c]);
    });
  });
  if (training) update_running_stats(running_mean, running_var, st, static_cast<double>(g.N * g.M), momentum);
  return {scale, channel_tensor(shift, acc)};
}

// ---------------------------------------------------------------------------------------------------
// Functional operators for compiled graphs (kernels/cpp_custom_op.py registers their fake implementations and
// the autograd formula): the running statistics are updated in copies that are returned (empty (0,) tensors when
// a call updates none), not written, as an operator inside an autograd formula must not write its inputs; a
// finite sample whose sum of squares overflows runs again multiplied by an exact power of two
// (kernels/overflow.py: L2BN is invariant to a positive scale of a sample), and the factors come back as
// `scale` (N,) in the accumulation type, ones where nothing overflowed. Written in C++ so that a compiled graph
// pays the dispatcher's few microseconds a call, not a Python operator's ~50.
// ---------------------------------------------------------------------------------------------------

namespace {

// kernels/overflow.py's huge_sample_factors(max |x_n|, 16), by the same ATen operations: per sample, in the
// accumulation type, the power of two that brings max |x_n| into [2^15, 2^16) for finite samples of
// max |x_n| ≥ 2^32, else 1.
Tensor huge_sample_factors(const Tensor& x) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < x.dim(); ++d) dims.push_back(d);
  const Tensor magnitude = at::amax(x.abs(), dims).to(at::toOpMathType(x.scalar_type()));
  const Tensor one = at::ones_like(magnitude);
  const Tensor huge = at::isfinite(magnitude).logical_and(magnitude >= 4294967296.0);  // 2^32
  return at::where(huge, at::ldexp(one, 16 - std::get<1>(at::frexp(magnitude))), one);
}

Tensor per_sample_view(const Tensor& factors, const Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = -1;
  return factors.to(like.scalar_type()).view(shape);
}

// Runs call(input); where a sample overflows (the kernel refuses before writing anything), call(input·s) with
// s = huge_sample_factors(input), which cannot overflow, and returns s (N,).
template <typename Call>
std::optional<Tensor> call_rescaled_on_overflow(const Tensor& input, const Call& call) {
  try {
    call(input);
    return std::nullopt;
  } catch (const c10::Error& error) {
    if (std::string(error.what_without_backtrace()).find(kOverflowMessage) == std::string::npos) throw;
  }
  const Tensor factors = huge_sample_factors(input);
  call(input * per_sample_view(factors, input));
  return factors;
}

// The `scale` output: the overflow factors, or ones (N,) in the accumulation type.
Tensor scale_output(const std::optional<Tensor>& factors, const Tensor& input) {
  if (factors.has_value()) return *factors;
  return at::ones({input.size(0)}, input.options().dtype(at::toOpMathType(input.scalar_type())));
}

// The running statistics a functional call reads or updates: copies when it updates them (returned), else the
// buffers themselves (read in eval) beside the empty tensors returned.
struct FunctionalStatistics {
  std::optional<Tensor> mean, var;
  Tensor new_mean, new_var;
};

FunctionalStatistics functional_statistics(const Tensor& input, const std::optional<Tensor>& running_mean,
                                           const std::optional<Tensor>& running_var, bool training) {
  const bool updates = training && running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                       running_var->defined();
  if (updates) {
    const Tensor mean = running_mean->clone(), var = running_var->clone();
    return {mean, var, mean, var};
  }
  return {running_mean, running_var, input.new_empty({0}), input.new_empty({0})};
}

// (y, scale, new running mean, new running variance): the whole forward, for graphs under torch.func transforms.
std::tuple<Tensor, Tensor, Tensor, Tensor> graph_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    double momentum, double eps, double l2_eps, bool rescale) {
  const at::NoGradGuard no_grad;  // the kernel alone: the autograd formula is the graph's
  FunctionalStatistics st = functional_statistics(input, running_mean, running_var, training);
  Tensor y;
  const std::optional<Tensor> factors = call_rescaled_on_overflow(input, [&](const Tensor& x) {
    y = l2_batch_norm_cpu(x, weight, bias, st.mean, st.var, training, momentum, eps, l2_eps, rescale);
  });
  return {y, scale_output(factors, input), st.new_mean, st.new_var};
}

// (A (N, C), S (C,), scale, new running mean, new running variance): l2_batch_norm_coefficients, functional;
// A carries the overflow factors (x·(s·A) = (x·s)·A).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> graph_coefficients(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    double momentum, double eps, double l2_eps, bool rescale) {
  FunctionalStatistics st = functional_statistics(input, running_mean, running_var, training);
  Tensor a, shift;
  const std::optional<Tensor> factors = call_rescaled_on_overflow(input, [&](const Tensor& x) {
    std::tie(a, shift) =
        l2_batch_norm_coefficients(x, weight, bias, st.mean, st.var, training, momentum, eps, l2_eps, rescale);
  });
  if (factors.has_value()) a = a * factors->unsqueeze(1);
  return {a, shift, scale_output(factors, input), st.new_mean, st.new_var};
}

// (dx, dweight, dbias) of graph_forward for the input it was given (scale: its overflow factors); the parameter
// gradients are empty (0,) tensors where the layer has no weight or no bias (has_bias; bias_dtype: its
// gradient's dtype).
std::tuple<Tensor, Tensor, Tensor> graph_backward(const Tensor& grad_out, const Tensor& input, const Tensor& scale,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& running_mean,
                                                  const std::optional<Tensor>& running_var, bool training, double eps,
                                                  double l2_eps, bool rescale, bool has_bias,
                                                  at::ScalarType bias_dtype) {
  const Tensor factors = scale.contiguous();
  bool rescaled = false;
  AT_DISPATCH_FLOATING_TYPES(factors.scalar_type(), "l2bn_graph_rescaled", [&] {
    const scalar_t* f = factors.const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < factors.numel(); ++n) rescaled = rescaled || f[n] != scalar_t(1);
  });
  const Tensor view = rescaled ? per_sample_view(scale, input) : Tensor();
  auto [dx, dweight, dbias] =
      l2_batch_norm_backward(grad_out, rescaled ? input * view : input, weight, running_mean, running_var, training,
                             eps, l2_eps, rescale, has_bias ? std::optional<at::ScalarType>(bias_dtype) : std::nullopt);
  return {rescaled ? dx * view : dx, dweight.defined() ? dweight : input.new_empty({0}),  // (outputs never alias)
          dbias.defined() ? dbias : input.new_empty({0})};
}

}  // namespace

// The element conversions above, exposed so that tests can compare them with torch's over every 16-bit
// pattern: float32 → ``dtype`` (stores), or float16/bfloat16 → float32 (loads); whole blocks of sixteen
// values through the passes' vector forms (widen16, narrow16; float16 with F16C), the rest one value at a time.
Tensor convert(const Tensor& input, at::ScalarType dtype) {
  const Tensor src = input.contiguous();
  Tensor out = at::empty(src.sizes(), src.options().dtype(dtype));
  const int64_t n = src.numel();
  if (src.scalar_type() == at::kFloat) {
    const float* p = src.const_data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "l2bn_convert_store", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = vector_stores(o, p, n); i < n; ++i) store(o, i, static_cast<at::opmath_type<scalar_t>>(p[i]));
    });
  } else {
    TORCH_CHECK(dtype == at::kFloat, "convert: loads go to float32");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "l2bn_convert_load", [&] {
      const scalar_t* p = src.const_data_ptr<scalar_t>();
      float* o = out.mutable_data_ptr<float>();
      to_float(p, o, n);
    });
  }
  return out;
}

TORCH_LIBRARY(l2bn_cpu, m) {
  m.def(
      "l2_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, float l2_eps, bool rescale) -> Tensor",
      &l2_batch_norm_cpu);
  m.def(
      "l2_batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, float l2_eps, bool rescale, ScalarType? bias_dtype) "
      "-> (Tensor, Tensor, Tensor)",
      &l2_batch_norm_backward);
  m.def(
      "l2_batch_norm_coefficients(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, float l2_eps, bool rescale) "
      "-> (Tensor, Tensor)",
      &l2_batch_norm_coefficients);
  m.def("convert(Tensor input, ScalarType dtype) -> Tensor", &convert);
  m.def("sync_local_sums(Tensor input, float l2_eps, bool rescale) -> (Tensor, Tensor)", &sync_local_sums);
  m.def(
      "sync_output(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor sums, Tensor scale, float momentum, float eps) -> (Tensor, Tensor, Tensor)",
      &sync_output);
  m.def(
      "sync_gradient_sums(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, float l2_eps, bool rescale) "
      "-> (Tensor, Tensor)",
      &sync_gradient_sums);
  m.def(
      "sync_input_gradient(Tensor grad_out, Tensor input, Tensor? weight, Tensor workspace, Tensor mean, "
      "Tensor invstd, Tensor sums, float count, float l2_eps, bool rescale) -> Tensor",
      &sync_input_gradient);
  // the functional operators compiled graphs hold: CPU kernels (a catch-all one would be decomposed by the
  // tracers), fake implementations in this Python module, layout tags as kernels/cpp_custom_op.py explains
  m.set_python_module("l2bn.kernels.cpp_custom_op");
  m.def(
      "graph_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float momentum, float eps, float l2_eps, bool rescale) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::flexible_layout});
  m.impl("graph_forward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(graph_forward)));
  m.def(
      "graph_coefficients(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool training, float momentum, float eps, float l2_eps, bool rescale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::flexible_layout});
  m.impl("graph_coefficients", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(graph_coefficients)));
  m.def(
      "graph_backward(Tensor grad_out, Tensor input, Tensor scale, Tensor? weight, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, float l2_eps, bool rescale, bool has_bias, "
      "ScalarType bias_dtype) -> (Tensor, Tensor, Tensor)",
      {at::Tag::needs_fixed_stride_order});
  m.impl("graph_backward", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(graph_backward)));
}
