// CPU implementation of hfc/knn.h: OpenMP over query tiles, one OpenBLAS GEMM per (query tile x reference tile),
// a fused bounded per-row candidate buffer, exact recomputation of the survivors.
#include "hfc/knn.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "hfc/common.h"
#include "hfc/math.h"

namespace hfc {
namespace {

// Candidates are tested in blocks: a block whose minimum is not below the buffer's worst is skipped.
constexpr int64_t kScanBlock = 16;

// The `cap` smallest (key, index) pairs seen so far, ascending; equal keys keep arrival (= index) order.
template <typename T>
struct CandidateBuffer {
  T* key;
  int64_t* index;
  int64_t cap;
  int64_t size = 0;

  T threshold() const { return size < cap ? std::numeric_limits<T>::infinity() : key[size - 1]; }

  // Precondition: v < threshold().
  void insert(T v, int64_t j) {
    int64_t pos = size < cap ? size++ : cap - 1;
    for (; pos > 0 && key[pos - 1] > v; --pos) {
      key[pos] = key[pos - 1];
      index[pos] = index[pos - 1];
    }
    key[pos] = v;
    index[pos] = j;
  }
};

template <typename T>
double exact_sq_distance(const T* a, const T* b, int64_t d) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) {
    const double diff = double(a[c]) - double(b[c]);
    s += diff * diff;
  }
  return s;
}

// Exact distances of one row's candidates, re-sorted by (distance, index); writes the first k.
template <typename T>
void finish_row(const KnnParams& p, const T* x_row, const T* ref, const CandidateBuffer<T>& cand, T* dist,
                int64_t* index) {
  std::vector<std::pair<double, int64_t>> exact(cand.size);
  for (int64_t c = 0; c < cand.size; ++c)
    exact[c] = {exact_sq_distance(x_row, ref + cand.index[c] * p.d, p.d), cand.index[c]};
  std::sort(exact.begin(), exact.end());
  for (int64_t c = 0; c < p.k; ++c) {
    dist[c] = static_cast<T>(std::sqrt(exact[c].first));
    if (index) index[c] = exact[c].second;
  }
}

}  // namespace

void knn_validate(const KnnParams& p) {
  require(p.n >= 0, "x must have at least 0 rows, got " + std::to_string(p.n));
  require(p.d >= 1, "x and ref must have at least 1 column, got d=" + std::to_string(p.d));
  require(p.m >= 1, "ref must have at least 1 row, got " + std::to_string(p.m));
  require(!p.exclude_self || p.n == p.m, "exclude_self=True needs x to be the reference set (N == M), got N=" +
                                             std::to_string(p.n) + ", M=" + std::to_string(p.m));
  const int64_t limit = p.exclude_self ? p.m - 2 : p.m - 1;
  require(p.k >= 1 && p.k <= limit,
          "k must be between 1 and " + std::to_string(limit) + " (fewer than the " + std::to_string(p.m) +
              " references" + (p.exclude_self ? " minus the query itself" : "") + "), requested k=" +
              std::to_string(p.k));
  require(p.extra_candidates >= 0, "extra_candidates must be >= 0, got " + std::to_string(p.extra_candidates));
  require(p.tile_queries >= 1 && p.tile_refs >= 1, "tile sizes must be >= 1");
}

template <typename T>
void knn(const KnnParams& p, const T* x, const T* ref, T* dist, int64_t* index) {
  knn_validate(p);
  if (p.n == 0) return;
  const CentredPairs<T> pairs(x, p.n, ref, p.m, p.d);
  const int64_t cap = std::min(p.k + p.extra_candidates, p.exclude_self ? p.m - 1 : p.m);
  const int64_t tq = query_tile(p.n, p.tile_queries, pairs.threads()), tr = std::min(p.tile_refs, p.m);
  const int64_t n_tiles = (p.n + tq - 1) / tq;

#pragma omp parallel if (pairs.parallel)
  {
    DenormalGuard guard;
    std::vector<T> block(tq * tr), keys(tq * cap);
    std::vector<int64_t> ids(tq * cap);
    std::vector<CandidateBuffer<T>> cand(tq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t q0 = t * tq, rows = std::min(tq, p.n - q0);
      for (int64_t i = 0; i < rows; ++i) cand[i] = {keys.data() + i * cap, ids.data() + i * cap, cap};
      for (int64_t r0 = 0; r0 < p.m; r0 += tr) {
        const int64_t cols = std::min(tr, p.m - r0);
        pairs.partial_tile(q0, rows, r0, cols, block.data());
        for (int64_t i = 0; i < rows; ++i) {
          const T* row = block.data() + i * cols;
          const int64_t self = p.exclude_self ? q0 + i - r0 : -1;  // column of the query itself, if in this tile
          CandidateBuffer<T>& c = cand[i];
          T threshold = c.threshold();
          for (int64_t j0 = 0; j0 < cols; j0 += kScanBlock) {
            const int64_t j1 = std::min(cols, j0 + kScanBlock);
            int any = 0;
            for (int64_t j = j0; j < j1; ++j) any |= row[j] < threshold;  // one vector compare per block
            if (!any) continue;
            for (int64_t j = j0; j < j1; ++j) {
              if (row[j] < threshold && j != self) {
                c.insert(row[j], r0 + j);
                threshold = c.threshold();
              }
            }
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t q = q0 + i;
        finish_row(p, x + q * p.d, ref, cand[i], dist + q * p.k, index ? index + q * p.k : nullptr);
      }
    }
  }
}

template <typename T>
void lid(const KnnParams& p, const T* x, const T* ref, T* out) {
  knn_validate(p);
  std::vector<T> dist(p.n * p.k);
  knn(p, x, ref, dist.data(), static_cast<int64_t*>(nullptr));
  std::vector<double> row(p.k);
  for (int64_t i = 0; i < p.n; ++i) {
    std::copy(dist.begin() + i * p.k, dist.begin() + (i + 1) * p.k, row.begin());
    out[i] = static_cast<T>(lid_from_sorted(row.data(), static_cast<int>(p.k)));
  }
}

template void knn<float>(const KnnParams&, const float*, const float*, float*, int64_t*);
template void knn<double>(const KnnParams&, const double*, const double*, double*, int64_t*);
template void lid<float>(const KnnParams&, const float*, const float*, float*);
template void lid<double>(const KnnParams&, const double*, const double*, double*);

}  // namespace hfc
