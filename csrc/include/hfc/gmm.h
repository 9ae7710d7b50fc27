// Fused Gaussian-mixture log-likelihood + input gradient (and the HFC "nearest" mode), many layers per call.
//
// For a layer with K full-covariance components in dimension d, component k is given by its mean mu_k and the
// UPPER-triangular precision Cholesky factor U_k (sklearn's `precisions_cholesky_`, precision P_k = U_k U_k^T),
// plus log_norm_k = log w_k + sum_j log U_k[j,j] - d/2 log(2 pi). For a row x:
//   y_k = (x - mu_k) U_k,   q_k = ||y_k||^2,   logp_k = log_norm_k - q_k / 2.
// Mode kLogLik:  value = logsumexp_k logp_k (sklearn `score_samples`),
//                grad  = -sum_k r_k y_k U_k^T with r_k = softmax_k(logp_k) (computed online, max-shifted).
// Mode kNearest: value = q_{k*} with k* = argmax_k logp_k, grad = 2 y_{k*} U_{k*}^T (k* held fixed).
// component = k* (the most responsible component) in both modes.
//
// Only the upper triangle of each U_k is read. x is centred while it is loaded (never the uncentred
// x P x - 2 x P mu + mu P mu form, which loses whole nats in float32 on offset, ill-conditioned features).
// All arrays are dense row-major (C-contiguous). No Python needed: usable from any C++ code.
#pragma once

#include <cstdint>
#include <vector>

namespace hfc {

enum class GmmMode { kLogLik, kNearest };

// Rows per work item: tiles are at most this long, and shrink (down to kGmmMinRowTile) until there are at least
// kGmmItemsPerThread work items per thread. Override per call with GmmParams::row_tile.
constexpr int64_t kGmmMaxRowTile = 512;
constexpr int64_t kGmmMinRowTile = 16;
constexpr int64_t kGmmItemsPerThread = 2;
// Calls with less work than this (sum over tiles of rows * K * d * (d + 8)) run on one thread, with no
// OpenMP parallel region.
constexpr double kGmmMinParallelWork = 5e7;
// Layers with d <= this use register-blocked SIMD triangular products instead of OpenBLAS trmm (whose small-d
// kernels run at about half the sgemm rate). Measured on an AVX2 EPYC (N=4096, K=8, log-prob + grad): SIMD
// 0.6x the trmm time at d=96, 0.75-0.85x at d=128..192, equal at d=256. Override per call with
// GmmParams::simd_max_dim (0 = always BLAS).
constexpr int64_t kGmmSimdMaxDim = 192;

// One layer entry: inputs (read-only) and outputs (written by gmm_forward).
template <typename T>
struct GmmLayer {
  const T* x = nullptr;          // (n, d)
  const T* means = nullptr;      // (k, d)
  const T* prec_chol = nullptr;  // (k, d, d), upper triangular
  const T* log_norm = nullptr;   // (k,)
  int64_t n = 0;                 // rows (0 allowed)
  int64_t d = 0;                 // dimension (>= 1)
  int64_t k = 0;                 // components (>= 1)
  T* value = nullptr;            // (n,) out
  T* grad = nullptr;             // (n, d) out; nullptr = gradient not needed
  int64_t* component = nullptr;  // (n,) out; nullptr = not needed
};

template <typename T>
struct GmmParams {
  std::vector<GmmLayer<T>> layers;
  GmmMode mode = GmmMode::kLogLik;
  int64_t row_tile = 0;                       // 0 = automatic (see kGmmMaxRowTile)
  int64_t simd_max_dim = kGmmSimdMaxDim;      // see kGmmSimdMaxDim
  int num_threads = 0;   // 0 = OpenMP default
};

// Checks every layer (d >= 1, k >= 1, n >= 0, required pointers set); throws hfc::ArgumentError.
template <typename T>
void gmm_validate(const GmmParams<T>& params);

// Validates, then computes all layers in one OpenMP-parallel pass over (layer, row-tile) work items.
template <typename T>
void gmm_forward(const GmmParams<T>& params);

extern template void gmm_validate<float>(const GmmParams<float>&);
extern template void gmm_validate<double>(const GmmParams<double>&);
extern template void gmm_forward<float>(const GmmParams<float>&);
extern template void gmm_forward<double>(const GmmParams<double>&);

}  // namespace hfc
