// L2BN on the CPU: the whole layer in three passes over memory, like BatchNorm's own kernels.
//
// x has shape (N, C, *S), M = |S|, D = C·M, laid out either as rows (n, c, m) -> (n·C + c)·M + m
// (contiguous) or channels-last (n, c, m) -> (n·M + m)·C + c. Notation and algebra: docs/algorithm.md.
//
//   forward (training)  per (n, c): mean m and centred sum of squares q = Σ_S (x − m)²   (one read of x;
//                       the second, centred pass re-reads a block that is still in cache)
//                       O(N·C) algebra in float64: r_n, μ_c, σ²_c (Chan et al.'s pooled variance)
//                       y = x·a[n,c] + b[c]                                                  (one read, one write)
//   forward (eval)      per sample ‖x_n‖ (one read), then the same output pass
//   backward            per (n, c): m, q, Σ dy, Σ dy·(x − m)                                 (one read of x, dy)
//                       dx = dy·P[n,c] + x·Q[n,c] + R[n,c]                                  (one read each, one write)
//
// Only x and the weight are saved for backward (the running statistics too in evaluation mode): the
// per-(n, c) moments are recomputed from x during the read backward needs anyway.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 512;  // values summed in the accumulation type before a float64 add

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
  return {N, C, C == 0 || N == 0 ? 0 : x.numel() / (N * C), is_channels_last(x)};
}

std::vector<double> to_vector(const std::optional<Tensor>& t, int64_t size, double fill) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(size, fill);
  Tensor d = t->detach().to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + size);
}

// ---------------------------------------------------------------------------------------------------
// Reductions. Sums run in chunks of kChunk values in at::opmath_type (float for float/half/bfloat16,
// double for double, vectorised by the compiler), and the chunks are added in float64.
// ---------------------------------------------------------------------------------------------------

template <typename scalar_t>
double sum_of(const scalar_t* p, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  double total = 0;
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t end = std::min(len, start + kChunk);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) s += static_cast<acc_t>(p[i]);
    total += s;
  }
  return total;
}

template <typename scalar_t>
double squares_of(const scalar_t* p, int64_t len, double centre) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m = static_cast<acc_t>(centre);
  double total = 0;
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t end = std::min(len, start + kChunk);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = start; i < end; ++i) {
      const acc_t d = static_cast<acc_t>(p[i]) - m;
      s += d * d;
    }
    total += s;
  }
  return total;
}

// Σ (x − centre)², Σ dy, Σ dy·(x − centre) over one contiguous run.
template <typename scalar_t>
void gradient_sums_of(const scalar_t* x, const scalar_t* dy, int64_t len, double centre, double& sq, double& g,
                      double& gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m = static_cast<acc_t>(centre);
  sq = g = gx = 0;
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t end = std::min(len, start + kChunk);
    acc_t s_sq = 0, s_g = 0, s_gx = 0;
#pragma omp simd reduction(+ : s_sq, s_g, s_gx)
    for (int64_t i = start; i < end; ++i) {
      const acc_t d = static_cast<acc_t>(x[i]) - m;
      const acc_t gi = static_cast<acc_t>(dy[i]);
      s_sq += d * d;
      s_g += gi;
      s_gx += gi * d;
    }
    sq += s_sq;
    g += s_g;
    gx += s_gx;
  }
}

// Channels-last: column sums of an (rows, C) block, added into total[C] (float64).
template <typename scalar_t>
void column_sums(const scalar_t* p, int64_t rows, int64_t C, const double* centre, bool square, double* total) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> part(C), m(C, acc_t(0));
  if (centre != nullptr)
    for (int64_t c = 0; c < C; ++c) m[c] = static_cast<acc_t>(centre[c]);
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / 8);
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t end = std::min(rows, start + chunk_rows);
    std::fill(part.begin(), part.end(), acc_t(0));
    acc_t* __restrict__ out = part.data();
    const acc_t* __restrict__ mc = m.data();
    for (int64_t r = start; r < end; ++r) {
      const scalar_t* __restrict__ row = p + r * C;
      if (square) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - mc[c];
          out[c] += d * d;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] += static_cast<acc_t>(row[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) total[c] += part[c];
  }
}

// Channels-last: Σ (x − centre)², Σ dy, Σ dy·(x − centre) per column of an (rows, C) block.
template <typename scalar_t>
void column_gradient_sums(const scalar_t* x, const scalar_t* dy, int64_t rows, int64_t C, const double* centre,
                          double* sq, double* g, double* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> m(C), p_sq(C), p_g(C), p_gx(C);
  for (int64_t c = 0; c < C; ++c) m[c] = static_cast<acc_t>(centre[c]);
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / 8);
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t end = std::min(rows, start + chunk_rows);
    std::fill(p_sq.begin(), p_sq.end(), acc_t(0));
    std::fill(p_g.begin(), p_g.end(), acc_t(0));
    std::fill(p_gx.begin(), p_gx.end(), acc_t(0));
    acc_t* __restrict__ o_sq = p_sq.data();
    acc_t* __restrict__ o_g = p_g.data();
    acc_t* __restrict__ o_gx = p_gx.data();
    const acc_t* __restrict__ mc = m.data();
    for (int64_t r = start; r < end; ++r) {
      const scalar_t* __restrict__ xr = x + r * C;
      const scalar_t* __restrict__ gr = dy + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(xr[c]) - mc[c];
        const acc_t gi = static_cast<acc_t>(gr[c]);
        o_sq[c] += d * d;
        o_g[c] += gi;
        o_gx[c] += gi * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sq[c] += p_sq[c];
      g[c] += p_g[c];
      gx[c] += p_gx[c];
    }
  }
}

// Per-(n, c) mean and centred sum of squares, (N·C) float64 each.
void moments(const Tensor& x, const Geometry& g, std::vector<double>& mean, std::vector<double>& sumsq) {
  mean.assign(g.N * g.C, 0.0);
  sumsq.assign(g.N * g.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_moments", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    if (!g.channels_last) {
      at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(g.M, 1)), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* p = data + b * g.M;
          mean[b] = sum_of(p, g.M) / g.M;
          sumsq[b] = squares_of(p, g.M, mean[b]);
        }
      });
    } else {
      at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* p = data + n * g.M * g.C;
          double* m = mean.data() + n * g.C;
          column_sums(p, g.M, g.C, nullptr, false, m);
          for (int64_t c = 0; c < g.C; ++c) m[c] /= g.M;
          column_sums(p, g.M, g.C, m, true, sumsq.data() + n * g.C);
        }
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Elementwise pass: out = u·A[n,c] (+ v·B[n,c]) + S[n,c], A, B, S of shape (N·C).
// ---------------------------------------------------------------------------------------------------

template <typename scalar_t, bool kTwoInputs>
void affine_pass_typed(const Tensor& u, const Tensor& v, Tensor& out, const Geometry& g, const std::vector<double>& A,
                       const std::vector<double>& B, const std::vector<double>& S) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> a(A.begin(), A.end()), s(S.begin(), S.end());
  std::vector<acc_t> bq(kTwoInputs ? B.size() : 0);
  if constexpr (kTwoInputs) std::copy(B.begin(), B.end(), bq.begin());
  const scalar_t* up = u.const_data_ptr<scalar_t>();
  const scalar_t* vp = kTwoInputs ? v.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  if (!g.channels_last) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(g.M, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* __restrict__ ub = up + b * g.M;
        scalar_t* __restrict__ ob = op + b * g.M;
        const acc_t ab = a[b], sb = s[b];
        if constexpr (kTwoInputs) {
          const scalar_t* __restrict__ vb = vp + b * g.M;
          const acc_t bb = bq[b];
#pragma omp simd
          for (int64_t i = 0; i < g.M; ++i)
            ob[i] = static_cast<scalar_t>(static_cast<acc_t>(ub[i]) * ab + static_cast<acc_t>(vb[i]) * bb + sb);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < g.M; ++i) ob[i] = static_cast<scalar_t>(static_cast<acc_t>(ub[i]) * ab + sb);
        }
      }
    });
  } else {
    const int64_t rows = g.N * g.M;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(g.C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.M;
        const acc_t* __restrict__ an = a.data() + n * g.C;
        const acc_t* __restrict__ sn = s.data() + n * g.C;
        const scalar_t* __restrict__ ur = up + r * g.C;
        scalar_t* __restrict__ orow = op + r * g.C;
        if constexpr (kTwoInputs) {
          const acc_t* __restrict__ bn = bq.data() + n * g.C;
          const scalar_t* __restrict__ vr = vp + r * g.C;
#pragma omp simd
          for (int64_t c = 0; c < g.C; ++c)
            orow[c] = static_cast<scalar_t>(static_cast<acc_t>(ur[c]) * an[c] + static_cast<acc_t>(vr[c]) * bn[c] + sn[c]);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < g.C; ++c) orow[c] = static_cast<scalar_t>(static_cast<acc_t>(ur[c]) * an[c] + sn[c]);
        }
      }
    });
  }
}

void affine_pass(const Tensor& u, const Tensor* v, Tensor& out, const Geometry& g, const std::vector<double>& A,
                 const std::vector<double>* B, const std::vector<double>& S) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "l2bn_affine", [&] {
    if (v != nullptr)
      affine_pass_typed<scalar_t, true>(u, *v, out, g, A, *B, S);
    else
      affine_pass_typed<scalar_t, false>(u, u, out, g, A, S, S);
  });
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

double target_norm(const Geometry& g, bool rescale) {
  return rescale ? std::sqrt(static_cast<double>(g.C * g.M)) : 1.0;
}

// r_n and ‖x_n‖ from per-sample sums of squares ‖x_n‖².
void scales_from_squares(const std::vector<double>& squares, const Geometry& g, bool rescale, double l2_eps,
                         Statistics& st) {
  st.norm.resize(g.N);
  st.scale.resize(g.N);
  const double target = target_norm(g, rescale);
  for (int64_t n = 0; n < g.N; ++n) {
    st.norm[n] = std::sqrt(squares[n]);
    st.scale[n] = target / std::max(st.norm[n], l2_eps);
  }
}

// ‖x_n‖² = Σ_c (q + M·m²); μ_c = mean_n r_n m; σ²_c = Σ_n r_n² q / (N·M) + mean_n (r_n m − μ_c)².
Statistics batch_statistics(const std::vector<double>& mean, const std::vector<double>& sumsq, const Geometry& g,
                            bool rescale, double l2_eps) {
  Statistics st;
  std::vector<double> squares(g.N, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t i = n * g.C + c;
      squares[n] += sumsq[i] + g.M * mean[i] * mean[i];
    }
  scales_from_squares(squares, g, rescale, l2_eps, st);
  st.mu.assign(g.C, 0.0);
  st.var.assign(g.C, 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) st.mu[c] += st.scale[n] * mean[n * g.C + c];
  for (int64_t c = 0; c < g.C; ++c) st.mu[c] /= g.N;
  for (int64_t n = 0; n < g.N; ++n) {
    const double r = st.scale[n];
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t i = n * g.C + c;
      const double between = r * mean[i] - st.mu[c];
      st.var[c] += r * r * sumsq[i] / (static_cast<double>(g.N) * g.M) + between * between / g.N;
    }
  }
  return st;
}

// Per-sample ‖x_n‖² in one read (a sample is contiguous in both layouts).
std::vector<double> sample_squares(const Tensor& x, const Geometry& g) {
  const int64_t D = g.C * g.M;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), D / 16384 + 1));
  const int64_t piece = (D + pieces - 1) / pieces;
  std::vector<double> partial(g.N * pieces, 0.0), squares(g.N, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_sample_squares", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * pieces, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / pieces, start = (i % pieces) * piece;
        const int64_t len = std::max<int64_t>(0, std::min(D, start + piece) - start);
        partial[i] = squares_of(data + n * D + start, len, 0.0);
      }
    });
  });
  for (int64_t i = 0; i < g.N * pieces; ++i) squares[i / pieces] += partial[i];
  return squares;
}

void update_running_stats(const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                          const Statistics& st, const Geometry& g, double momentum) {
  if (!running_mean.has_value() || !running_mean->defined()) return;
  const double count = static_cast<double>(g.N * g.M);
  std::vector<double> unbiased(st.var);
  for (double& v : unbiased) v *= count / (count - 1);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  Tensor rm = *running_mean, rv = *running_var;
  rm.lerp_(at::from_blob(const_cast<double*>(st.mu.data()), {g.C}, opts).to(rm.scalar_type()), momentum);
  rv.lerp_(at::from_blob(unbiased.data(), {g.C}, opts).to(rv.scalar_type()), momentum);
}

// ---------------------------------------------------------------------------------------------------
// Forward and backward
// ---------------------------------------------------------------------------------------------------

Tensor l2bn_forward(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
               double momentum, double eps, double l2_eps, bool rescale) {
  const Tensor x = dense(input);
  const Geometry g = geometry(x);
  Statistics st;
  if (training) {
    std::vector<double> mean, sumsq;
    moments(x, g, mean, sumsq);
    st = batch_statistics(mean, sumsq, g, rescale, l2_eps);
  } else {
    scales_from_squares(sample_squares(x, g), g, rescale, l2_eps, st);
    st.mu = to_vector(running_mean, g.C, 0.0);
    st.var = to_vector(running_var, g.C, 1.0);
  }
  const std::vector<double> w = to_vector(weight, g.C, 1.0), b = to_vector(bias, g.C, 0.0);
  std::vector<double> A(g.N * g.C), S(g.N * g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    const double gain = w[c] / std::sqrt(st.var[c] + eps);
    const double shift = b[c] - st.mu[c] * gain;
    for (int64_t n = 0; n < g.N; ++n) {
      A[n * g.C + c] = st.scale[n] * gain;
      S[n * g.C + c] = shift;
    }
  }
  Tensor y = at::empty_like(x);
  affine_pass(x, nullptr, y, g, A, nullptr, S);
  if (training) update_running_stats(running_mean, running_var, st, g, momentum);
  return y;
}

struct Gradients {
  Tensor input, weight, bias;
};

// Backward of L2BN; with training=false the statistics are the fixed running ones.
Gradients l2bn_backward(const Tensor& grad_out, const Tensor& input, const Tensor& weight, const Tensor& running_mean,
                   const Tensor& running_var, bool training, double eps, double l2_eps, bool rescale) {
  const Tensor x = dense(input);
  const Tensor dy = like(grad_out, x);
  const Geometry g = geometry(x);
  const int64_t NC = g.N * g.C;
  // Per (n, c): the centre m (the mean in training, 0 with fixed statistics), Σ (x − m)², Σ dy, Σ dy·(x − m).
  std::vector<double> centre(NC, 0.0), sq(NC, 0.0), dsum(NC, 0.0), dxc(NC, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2bn_backward_sums", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    if (!g.channels_last) {
      at::parallel_for(0, NC, std::max<int64_t>(1, 4096 / std::max<int64_t>(g.M, 1)), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          if (training) centre[b] = sum_of(xp + b * g.M, g.M) / g.M;
          gradient_sums_of(xp + b * g.M, gp + b * g.M, g.M, centre[b], sq[b], dsum[b], dxc[b]);
        }
      });
    } else {
      at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t off = n * g.M * g.C;
          double* m = centre.data() + n * g.C;
          if (training) {
            column_sums(xp + off, g.M, g.C, nullptr, false, m);
            for (int64_t c = 0; c < g.C; ++c) m[c] /= g.M;
          }
          column_gradient_sums(xp + off, gp + off, g.M, g.C, m, sq.data() + n * g.C, dsum.data() + n * g.C,
                               dxc.data() + n * g.C);
        }
      });
    }
  });

  Statistics st;
  if (training) {
    st = batch_statistics(centre, sq, g, rescale, l2_eps);
  } else {  // with centre 0, sq is Σ x² per (n, c)
    std::vector<double> squares(g.N, 0.0);
    for (int64_t i = 0; i < NC; ++i) squares[i / g.C] += sq[i];
    scales_from_squares(squares, g, rescale, l2_eps, st);
    st.mu = to_vector(running_mean, g.C, 0.0);
    st.var = to_vector(running_var, g.C, 1.0);
  }
  const std::vector<double> w = to_vector(weight, g.C, 1.0);
  const double count = static_cast<double>(g.N * g.M);
  std::vector<double> invstd(g.C), gain(g.C), grad_w(g.C, 0.0), grad_b(g.C, 0.0);
  for (int64_t c = 0; c < g.C; ++c) {
    invstd[c] = 1.0 / std::sqrt(st.var[c] + eps);
    gain[c] = w[c] * invstd[c];
  }
  // Σ dy and Σ dy·ẑ per channel, with ẑ = (r_n x − μ)·invstd and r_n·m − μ the (n, c) mean of z − μ.
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t i = n * g.C + c;
      const double zc = st.scale[n] * centre[i] - st.mu[c];
      grad_b[c] += dsum[i];
      grad_w[c] += invstd[c] * (st.scale[n] * dxc[i] + zc * dsum[i]);
    }
  // dz = gain·(dy − Σdy/count − ẑ·Σdy·ẑ/count) with batch statistics, gain·dy with fixed ones; then the l2 step
  // dx = r_n (dz − x·T_n / ‖x_n‖²) with T_n = Σ dz·x (nothing where the norm was clamped).
  std::vector<double> P(NC), Q(NC), R(NC);
  for (int64_t n = 0; n < g.N; ++n) {
    const double r = st.scale[n];
    double t = 0;
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t i = n * g.C + c;
      double dz_sum = gain[c] * dsum[i], dz_xc = gain[c] * dxc[i], k = 0;
      if (training) {
        k = gain[c] * invstd[c] * grad_w[c] / count;
        const double zc = r * centre[i] - st.mu[c];
        dz_sum -= g.M * (gain[c] * grad_b[c] / count + k * zc);
        dz_xc -= k * r * sq[i];
        R[i] = r * (k * st.mu[c] - gain[c] * grad_b[c] / count);
      } else {
        R[i] = 0.0;
      }
      P[i] = r * gain[c];
      Q[i] = -k * r;  // completed below with the l2 term
      t += dz_xc + centre[i] * dz_sum;
    }
    const double u = st.norm[n] > l2_eps ? t / (st.norm[n] * st.norm[n]) : 0.0;
    for (int64_t c = 0; c < g.C; ++c) Q[n * g.C + c] = r * (Q[n * g.C + c] - u);
  }
  Gradients out;
  out.input = at::empty_like(x);
  affine_pass(dy, &x, out.input, g, P, &Q, R);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  if (weight.defined()) out.weight = at::from_blob(grad_w.data(), {g.C}, opts).to(weight.scalar_type(), false, true);
  out.bias = at::from_blob(grad_b.data(), {g.C}, opts).clone();
  return out;
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
    Gradients grads = l2bn_backward(dy, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["training"].toBool(),
                                 ctx->saved_data["eps"].toDouble(), ctx->saved_data["l2_eps"].toDouble(),
                                 ctx->saved_data["rescale"].toBool());
    const Tensor none;
    const Tensor grad_bias =
        ctx->saved_data["has_bias"].toBool() ? grads.bias.to(ctx->saved_data["bias_dtype"].toScalarType()) : none;
    return {grads.input, grads.weight, grad_bias, none, none, none, none, none, none, none};
  }
};

}  // namespace

Tensor l2_batch_norm_cpu(const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                         const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                         bool training, double momentum, double eps, double l2_eps, bool rescale) {
  TORCH_CHECK(input.device().is_cpu(), "l2bn's compiled kernel runs on the CPU, got input on ", input.device());
  TORCH_CHECK(input.dim() >= 2 && input.numel() > 0, "l2bn's compiled kernel expects non-empty (N, C, *) input");
  return L2BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps,
                                    rescale);
}

TORCH_LIBRARY(l2bn_cpu, m) {
  m.def(
      "l2_batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, float l2_eps, bool rescale) -> Tensor",
      &l2_batch_norm_cpu);
}
