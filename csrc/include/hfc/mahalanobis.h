// Squared Mahalanobis distances of rows to C class means under one tied precision, many layers per call:
//   out[i, c] = (x_i - mu_c)^T P (x_i - mu_c).
// Method per layer: S = (P + P^T) / 2 (the quadratic form only sees the symmetric part) is factored once in double,
// S = L L^T (LAPACK dpotrf; not positive definite -> hfc::ArgumentError naming `precision`). With the common centre
// c = mean of the means, z_i = (x_i - c) L (x centred while loaded, one triangular product = half an
// N x d x d GEMM) and m_c = (mu_c - c) L, out[i, c] = ||z_i - m_c||^2 by direct differences.
// OpenMP over (layer, row tile) work items. All arrays dense row-major. No Python needed.
#pragma once

#include <cstdint>
#include <vector>

namespace hfc {

// Rows per work item (the per-thread buffer is row_tile x d).
constexpr int64_t kMahalanobisRowTile = 256;

template <typename T>
struct MahalanobisLayer {
  const T* x = nullptr;          // (n, d)
  const T* means = nullptr;      // (c, d)
  const T* precision = nullptr;  // (d, d)
  int64_t n = 0;                 // rows (0 allowed)
  int64_t c = 0;                 // classes (>= 1)
  int64_t d = 0;                 // dimension (>= 1)
  T* out = nullptr;              // (n, c) out
};

template <typename T>
struct MahalanobisParams {
  std::vector<MahalanobisLayer<T>> layers;
  int64_t row_tile = kMahalanobisRowTile;
};

// Checks sizes and pointers of every layer; throws hfc::ArgumentError.
template <typename T>
void mahalanobis_validate(const MahalanobisParams<T>& params);

// Validates, factors every precision (throws if one is not positive definite), then fills every layer's out.
template <typename T>
void mahalanobis(const MahalanobisParams<T>& params);

extern template void mahalanobis_validate<float>(const MahalanobisParams<float>&);
extern template void mahalanobis_validate<double>(const MahalanobisParams<double>&);
extern template void mahalanobis<float>(const MahalanobisParams<float>&);
extern template void mahalanobis<double>(const MahalanobisParams<double>&);

}  // namespace hfc
