// CPU implementation of hfc/kde.h: OpenMP over query tiles, one OpenBLAS GEMM per (query tile x reference tile),
// per block and row a vectorised max and sum of exp (hfc::exp_nonpositive) merged into an online log-sum-exp.
#include "hfc/kde.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "hfc/common.h"
#include "hfc/math.h"

namespace hfc {
namespace {

std::string bandwidth_str(double h) {
  std::ostringstream out;
  out << h;
  return out.str();
}

}  // namespace

void kde_validate(const KdeParams& p) {
  require(p.n >= 0, "x must have at least 0 rows, got " + std::to_string(p.n));
  require(p.m >= 1, "ref must have at least 1 row, got " + std::to_string(p.m));
  require(p.d >= 1, "x and ref must have at least 1 column, got d=" + std::to_string(p.d));
  require(std::isfinite(p.bandwidth) && p.bandwidth > 0,
          "bandwidth must be a positive finite number, got " + bandwidth_str(p.bandwidth));
  require(p.tile_queries >= 1 && p.tile_refs >= 1, "tile sizes must be >= 1");
}

template <typename T>
void kde_log_density(const KdeParams& p, const T* x, const T* ref, T* out) {
  kde_validate(p);
  if (p.n == 0) return;
  const CentredPairs<T> pairs(x, p.n, ref, p.m, p.d);
  const T scale = static_cast<T>(-0.5 / (p.bandwidth * p.bandwidth));
  require(std::isfinite(scale), "bandwidth=" + bandwidth_str(p.bandwidth) +
                                    " is too small for this dtype (1 / (2 h^2) overflows); use float64");
  const double log_norm = kde_log_norm<double>(static_cast<int>(p.d), static_cast<int>(p.m), p.bandwidth);
  const int64_t tq = query_tile(p.n, p.tile_queries, pairs.threads()), tr = std::min(p.tile_refs, p.m);
  const int64_t n_tiles = (p.n + tq - 1) / tq;

#pragma omp parallel if (pairs.parallel)
  {
    DenormalGuard guard;
    std::vector<T> block(tq * tr);
    std::vector<OnlineLse<double>> lse(tq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t q0 = t * tq, rows = std::min(tq, p.n - q0);
      std::fill(lse.begin(), lse.begin() + rows, OnlineLse<double>{});
      for (int64_t r0 = 0; r0 < p.m; r0 += tr) {
        const int64_t cols = std::min(tr, p.m - r0);
        pairs.partial_tile(q0, rows, r0, cols, block.data());
        for (int64_t i = 0; i < rows; ++i) {
          T* row = block.data() + i * cols;
          const T x_norm = pairs.x_norm[q0 + i];
          T block_max = -INFINITY;
#pragma omp simd reduction(max : block_max)
          for (int64_t j = 0; j < cols; ++j) {
            const T t = std::max(row[j] + x_norm, T(0)) * scale;  // -||x - r||^2 / (2 h^2), rounding clamped
            row[j] = t;
            block_max = std::max(block_max, t);
          }
          OnlineLse<double>& s = lse[i];
          const double new_max = std::max(s.max, double(block_max));
          const T shift = static_cast<T>(new_max);
          T block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
          for (int64_t j = 0; j < cols; ++j) block_sum += exp_nonpositive(row[j] - shift);
          s.sum = s.sum * std::exp(s.max - new_max) + double(block_sum);
          s.max = new_max;
        }
      }
      for (int64_t i = 0; i < rows; ++i) out[q0 + i] = static_cast<T>(lse[i].value() - log_norm);
    }
  }
}

template void kde_log_density<float>(const KdeParams&, const float*, const float*, float*);
template void kde_log_density<double>(const KdeParams&, const double*, const double*, double*);

}  // namespace hfc
