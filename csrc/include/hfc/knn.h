// Exact k-nearest-neighbour Euclidean distances and the LID estimate, brute force on CPU.
//
// For every query row x_i (of X, n x d) the k nearest rows of the reference set R (m x d), ascending, with their
// indices. Method: centre both sets on the reference mean; stream (query tile x reference tile) blocks of
// ||r||^2 - 2 x.r from one GEMM per block; keep per row the best k + extra_candidates candidates in a small
// sorted buffer (a candidate costs one comparison with the buffer's worst unless it enters); then recompute the
// candidates' distances exactly from the inputs (direct differences, accumulated in double) and re-sort.
// The N x M distance matrix is never stored. Ties are broken by the smaller reference index.
// exclude_self: X is R itself (n == m) and query i never returns reference i.
// All arrays are dense row-major (C-contiguous). No Python needed: usable from any C++ code.
#pragma once

#include <cstdint>

namespace hfc {

// Candidates kept beyond k while streaming, so that neighbours whose GEMM-estimated distances are off by rounding
// still reach the exact recomputation. Query/reference tile sizes of the streamed GEMM blocks (query tiles shrink
// for small N so every thread gets several, see hfc::query_tile).
constexpr int64_t kKnnExtraCandidates = 8;
constexpr int64_t kKnnTileQueries = 256;
constexpr int64_t kKnnTileRefs = 512;

struct KnnParams {
  int64_t n = 0;  // queries (0 allowed)
  int64_t m = 0;  // references
  int64_t d = 0;  // dimension (>= 1)
  int64_t k = 0;  // neighbours: 1 <= k < m (k < m - 1 with exclude_self)
  bool exclude_self = false;
  int64_t extra_candidates = kKnnExtraCandidates;
  int64_t tile_queries = kKnnTileQueries;
  int64_t tile_refs = kKnnTileRefs;
};

// Checks sizes and options; throws hfc::ArgumentError stating the limit and the value requested.
void knn_validate(const KnnParams& params);

// dist (n, k) ascending Euclidean distances and index (n, k) reference rows; index may be nullptr.
template <typename T>
void knn(const KnnParams& params, const T* x, const T* ref, T* dist, int64_t* index);

// out (n,): LID = -(1/k sum_i log(r_i / r_k))^-1 over the k nearest distances (hfc::lid_from_sorted).
template <typename T>
void lid(const KnnParams& params, const T* x, const T* ref, T* out);

extern template void knn<float>(const KnnParams&, const float*, const float*, float*, int64_t*);
extern template void knn<double>(const KnnParams&, const double*, const double*, double*, int64_t*);
extern template void lid<float>(const KnnParams&, const float*, const float*, float*);
extern template void lid<double>(const KnnParams&, const double*, const double*, double*);

}  // namespace hfc
