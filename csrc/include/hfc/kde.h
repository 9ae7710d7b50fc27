// Gaussian kernel density log-density, equal to sklearn KernelDensity(kernel="gaussian", bandwidth=h):
//   log p(x_i) = logsumexp_j(-||x_i - r_j||^2 / (2 h^2)) - log m - d/2 log(2 pi h^2)   (hfc::kde_log_norm).
// Method: centre both sets on the reference mean; stream (query tile x reference tile) blocks of squared
// distances from one GEMM per block; per row an online max-shifted log-sum-exp (hfc::OnlineLse) merges each
// block's terms. No N x M matrix is stored. All arrays dense row-major. No Python needed.
#pragma once

#include <cstdint>

namespace hfc {

// Query/reference tile sizes of the streamed GEMM blocks (query tiles shrink for small N, see hfc::query_tile).
constexpr int64_t kKdeTileQueries = 256;
constexpr int64_t kKdeTileRefs = 512;

struct KdeParams {
  int64_t n = 0;          // queries (0 allowed)
  int64_t m = 0;          // references (>= 1)
  int64_t d = 0;          // dimension (>= 1)
  double bandwidth = 1;   // h > 0, finite
  int64_t tile_queries = kKdeTileQueries;
  int64_t tile_refs = kKdeTileRefs;
};

// Checks sizes and the bandwidth; throws hfc::ArgumentError naming the argument.
void kde_validate(const KdeParams& params);

// out (n,) log densities of the rows of x (n, d) under the KDE on ref (m, d).
template <typename T>
void kde_log_density(const KdeParams& params, const T* x, const T* ref, T* out);

extern template void kde_log_density<float>(const KdeParams&, const float*, const float*, float*);
extern template void kde_log_density<double>(const KdeParams&, const double*, const double*, double*);

}  // namespace hfc
