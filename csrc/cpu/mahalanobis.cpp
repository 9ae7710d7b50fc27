// CPU implementation of hfc/mahalanobis.h: double-precision Cholesky per layer, then OpenMP over (layer, row tile)
// work items, each one OpenBLAS triangular product of the centred rows and a direct-difference distance pass.
#include "hfc/mahalanobis.h"

#include <algorithm>
#include <cblas.h>
#include <lapacke.h>
#include <string>
#include <vector>

#include "hfc/common.h"

namespace hfc {
namespace {

// B := B L for row-major B (m, n) and lower-triangular L (n, n).
inline void trmm_right_lower(int64_t m, int64_t n, const float* l, float* b) {
  scipy_cblas_strmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<blasint>(m),
                    static_cast<blasint>(n), 1.0f, l, static_cast<blasint>(n), b, static_cast<blasint>(n));
}
inline void trmm_right_lower(int64_t m, int64_t n, const double* l, double* b) {
  scipy_cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<blasint>(m),
                    static_cast<blasint>(n), 1.0, l, static_cast<blasint>(n), b, static_cast<blasint>(n));
}

// Per layer: the centre, the Cholesky factor (in the kernel dtype) and the transformed means (in double).
template <typename T>
struct Factored {
  std::vector<T> centre, chol;
  std::vector<double> means_z;
  int info = 0;  // > 0: leading minor `info` of the symmetrised precision is not positive definite
};

template <typename T>
Factored<T> factor(const MahalanobisLayer<T>& L) {
  const int64_t d = L.d, c = L.c;
  Factored<T> f;
  std::vector<double> centre(d, 0.0), s(d * d);
  for (int64_t k = 0; k < c; ++k)
    for (int64_t j = 0; j < d; ++j) centre[j] += L.means[k * d + j] / double(c);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) s[i * d + j] = 0.5 * (double(L.precision[i * d + j]) + L.precision[j * d + i]);
  // Column-major 'U' on this symmetric buffer leaves the row-major lower factor L (S = L L^T) in place.
  f.info = scipy_LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', static_cast<lapack_int>(d), s.data(),
                                static_cast<lapack_int>(d));
  if (f.info != 0) return f;
  for (int64_t i = 0; i < d; ++i) std::fill(s.begin() + i * d + i + 1, s.begin() + (i + 1) * d, 0.0);
  f.chol.assign(s.begin(), s.end());
  f.centre.assign(centre.begin(), centre.end());
  f.means_z.assign(c * d, 0.0);
  for (int64_t k = 0; k < c; ++k)
    for (int64_t i = 0; i < d; ++i) {  // row k of (mu - centre) L: sum_i (mu_i - centre_i) L[i, :i+1]
      const double v = L.means[k * d + i] - centre[i];
      for (int64_t j = 0; j <= i; ++j) f.means_z[k * d + j] += v * s[i * d + j];
    }
  return f;
}

template <typename T>
void distance_tile(const MahalanobisLayer<T>& L, const Factored<T>& f, int64_t row0, int64_t rows, T* z) {
  const int64_t d = L.d;
  for (int64_t i = 0; i < rows; ++i) {
    const T* x = L.x + (row0 + i) * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) z[i * d + j] = x[j] - f.centre[j];
  }
  trmm_right_lower(rows, d, f.chol.data(), z);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < L.c; ++k) {
      const double* m = f.means_z.data() + k * d;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) {
        const double diff = double(z[i * d + j]) - m[j];
        s += diff * diff;
      }
      L.out[(row0 + i) * L.c + k] = static_cast<T>(s);
    }
}

}  // namespace

template <typename T>
void mahalanobis_validate(const MahalanobisParams<T>& p) {
  require(p.row_tile >= 1, "row_tile must be >= 1, got " + std::to_string(p.row_tile));
  for (size_t l = 0; l < p.layers.size(); ++l) {
    const auto& L = p.layers[l];
    const std::string where = p.layers.size() > 1 ? " (layer " + std::to_string(l) + ")" : "";
    require(L.d >= 1, "x, means and precision must have at least 1 column" + where);
    require(L.c >= 1, "means must have at least 1 row" + where);
    require(L.n >= 0, "x must have at least 0 rows" + where);
    require(L.means && L.precision && (L.n == 0 || (L.x && L.out)), "null array pointer" + where);
  }
}

template <typename T>
void mahalanobis(const MahalanobisParams<T>& p) {
  mahalanobis_validate(p);
  const int64_t n_layers = static_cast<int64_t>(p.layers.size());
  std::vector<Factored<T>> factors(n_layers);
#pragma omp parallel for schedule(dynamic, 1) if (n_layers > 1)
  for (int64_t l = 0; l < n_layers; ++l) factors[l] = factor(p.layers[l]);
  for (int64_t l = 0; l < n_layers; ++l)
    require(factors[l].info == 0,
            "precision" + (n_layers > 1 ? "[" + std::to_string(l) + "]" : std::string()) +
                " is not positive definite (leading minor " + std::to_string(factors[l].info) +
                " of its symmetric part); regularise the covariance before inverting it or use float64");

  std::vector<std::pair<int64_t, int64_t>> items;  // (layer, first row)
  int64_t max_d = 0;
  double multiply_adds = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    max_d = std::max(max_d, p.layers[l].d);
    multiply_adds += double(p.layers[l].n) * double(p.layers[l].d) * double(p.layers[l].d + p.layers[l].c);
    for (int64_t r = 0; r < p.layers[l].n; r += p.row_tile) items.emplace_back(l, r);
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel if (n_items > 1 && multiply_adds >= kMinParallelMultiplyAdds)
  {
    DenormalGuard guard;
    std::vector<T> z(p.row_tile * max_d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const auto [l, row0] = items[it];
      const auto& L = p.layers[l];
      distance_tile(L, factors[l], row0, std::min(p.row_tile, L.n - row0), z.data());
    }
  }
}

template void mahalanobis_validate<float>(const MahalanobisParams<float>&);
template void mahalanobis_validate<double>(const MahalanobisParams<double>&);
template void mahalanobis<float>(const MahalanobisParams<float>&);
template void mahalanobis<double>(const MahalanobisParams<double>&);

}  // namespace hfc
