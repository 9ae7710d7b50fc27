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
// Layers with d <= this use register-blocked SIMD triangular products on packed factors instead of OpenBLAS
// trmm (whose small-d and few-row kernels run far below the sgemm rate). Measured on a 2-core AVX-512 Xeon
// (log-prob + grad, float32, factors pre-packed): N=4096 K=8 SIMD 0.63x the trmm time at d=192, 0.9x at d=256,
// equal at d=512, 1.3x at d=1024; N=64 K=64 (HFC attack batches) 0.55x at d=512. Override per call with
// GmmParams::simd_max_dim (0 = always BLAS).
constexpr int64_t kGmmSimdMaxDim = 512;

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
  // (gmm_packed_size(d, k),) from gmm_pack(prec_chol), used by the SIMD path; nullptr = packed inside each call,
  // which costs O(K d^2) memory traffic: pass it when a mixture is reused (an attack calls once per step).
  const T* packed = nullptr;
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

// The SIMD path's copy of the factors (strips of U and U^T, only their nonzero rows; layout private to this
// build, since it depends on the vector width): size in elements, and the packing of prec_chol (k, d, d).
template <typename T>
int64_t gmm_packed_size(int64_t d, int64_t k);
template <typename T>
void gmm_pack(const T* prec_chol, int64_t d, int64_t k, T* packed);

extern template void gmm_validate<float>(const GmmParams<float>&);
extern template void gmm_validate<double>(const GmmParams<double>&);
extern template void gmm_forward<float>(const GmmParams<float>&);
extern template void gmm_forward<double>(const GmmParams<double>&);
extern template int64_t gmm_packed_size<float>(int64_t, int64_t);
extern template int64_t gmm_packed_size<double>(int64_t, int64_t);
extern template void gmm_pack<float>(const float*, int64_t, int64_t, float*);
extern template void gmm_pack<double>(const double*, int64_t, int64_t, double*);

}  // namespace hfc
