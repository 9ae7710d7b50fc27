// Host-callable launchers of the CUDA kernels (csrc/cuda/*.cu) and their parameter structs.
//
// Included by the .cu files (nvcc) and by the pybind11 bindings (g++, no CUDA device code here). Every pointer is
// a device pointer to a C-contiguous array of `dtype` elements (indices: int64) on the current CUDA device;
// outputs are allocated by the caller (torch). Each launcher enqueues its work on `stream` and returns without
// synchronising; invalid arguments throw std::invalid_argument, CUDA failures std::runtime_error with the CUDA
// error string ("CUDA error in gmm: no CUDA-capable device is detected").
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace hfc::cuda {

enum class DType { kFloat32, kFloat64 };

// One layer of a fused multi-layer GMM call (all layers run in one kernel launch).
struct GmmLayer {
  const void* x = nullptr;          // (n, d)
  const void* means = nullptr;      // (k, d)
  const void* prec_chol = nullptr;  // (k, d, d), upper-triangular L_k (entries below the diagonal are ignored)
  const void* log_norm = nullptr;   // (k,) log w_k + sum log diag L_k - d/2 log(2 pi)
  void* value = nullptr;            // (n,) out: log p(x) ("loglik") or ||(x - mu_k*) L_k*||^2 ("nearest")
  void* grad = nullptr;             // (n, d) out, or null when no gradient is wanted
  void* work = nullptr;             // (n, d) scratch for y = (x - mu_k) L_k; required when grad is set
  int64_t* component = nullptr;     // (n,) out: k* = argmax_k [log_norm_k - ||(x - mu_k) L_k||^2 / 2]
  int64_t n = 0;
  int d = 0;
  int k = 0;
};

struct GmmParams {
  DType dtype = DType::kFloat32;
  bool nearest = false;  // false: "loglik" mode, true: "nearest" mode
};

void gmm(const GmmParams& params, const std::vector<GmmLayer>& layers, cudaStream_t stream);

// One layer of a fused multi-layer Mahalanobis call: out[i, c] = ||(x_i - centre) U - proj_means_c||^2 where
// P = U U^T (U upper-triangular) and proj_means_c = (mu_c - centre) U, i.e. (x_i - mu_c)^T P (x_i - mu_c).
struct MahalanobisLayer {
  const void* x = nullptr;           // (n, d)
  const void* centre = nullptr;      // (d,) any point near the data, e.g. the mean of the class means
  const void* factor = nullptr;      // (d, d) upper-triangular U with U U^T = P
  const void* proj_means = nullptr;  // (c, d)
  void* out = nullptr;               // (n, c)
  int64_t n = 0;
  int d = 0;
  int c = 0;
};

void mahalanobis(DType dtype, const std::vector<MahalanobisLayer>& layers, cudaStream_t stream);

// k nearest references of every query: Euclidean distances ascending (ties by index), their indices.
struct KnnParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;       // (n, d) queries
  const void* ref = nullptr;     // (m, d) references
  const void* centre = nullptr;  // (d,) subtracted from both sides before the GEMM expansion, e.g. mean of ref
  void* dist = nullptr;          // (n, k) out
  int64_t* index = nullptr;      // (n, k) out
  void* work = nullptr;          // (n + m,) scratch: centred squared norms
  int64_t n = 0;
  int64_t m = 0;
  int d = 0;
  int k = 0;
  bool exclude_self = false;  // requires n == m; query i never returns reference i
};

void knn(const KnnParams& params, cudaStream_t stream);

// Gaussian KDE log density (sklearn KernelDensity(kernel="gaussian")).
struct KdeParams {
  DType dtype = DType::kFloat32;
  const void* x = nullptr;       // (n, d) queries
  const void* ref = nullptr;     // (m, d) references
  const void* centre = nullptr;  // (d,) e.g. mean of ref
  void* out = nullptr;           // (n,)
  void* work = nullptr;          // (n + m,) scratch: centred squared norms
  int64_t n = 0;
  int64_t m = 0;
  int d = 0;
  double bandwidth = 1.0;
};

void kde(const KdeParams& params, cudaStream_t stream);

}  // namespace hfc::cuda
