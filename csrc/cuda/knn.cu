// k nearest references of every query: Euclidean distances ascending (ties by index) and their indices.
//
// Three launches on one stream:
//   1. centred squared norms of queries and references (one warp per row, tiles.cuh), centre = e.g. mean of ref;
//   2. selection: a block owns 32 query rows and sweeps the references in tiles of 32. Each 32 x 32 tile of
//      squared distances comes from the GEMM expansion on centred operands (centred_sq_distance_tile: both sides
//      centred while staged in shared memory; centring makes the expansion ~10x more accurate in float32) and is
//      parked in shared memory; then the block's first warp, one thread per query row, scans the 32 candidates
//      against the row's current k-th distance (kept in a register) and insertion-sorts the few that beat it into
//      the row's list, which lives in the (N, k) outputs themselves (so k is not limited by shared memory; after
//      the first tiles almost every candidate is rejected by the register comparison). exclude_self drops j == i.
//   3. refinement: one warp per query recomputes the k selected distances exactly by direct differences (lanes
//      stride over the features, coalesced) and re-sorts the row by (distance, index).
#include <cmath>

#include "tiles.cuh"

namespace hfc::cuda {
namespace {

template <typename T>
struct KnnArgs {
  const T* x;
  const T* ref;
  const T* centre;
  const T* x_norms;
  const T* ref_norms;
  T* dist;
  int64_t* index;
  int64_t n;
  int64_t m;
  int d;
  int k;
  bool exclude_self;
};

// Inserts (v, j) into the ascending list (dist[0..k), index[0..k)) holding `filled` entries; equal distances keep
// the earlier entry first. Returns the new number of entries.
template <typename T>
__device__ int insert_sorted(T* dist, int64_t* index, int k, int filled, T v, int64_t j) {
  int p = filled < k ? filled++ : k - 1;  // the slot that opens (the current k-th falls off a full list)
  while (p > 0 && dist[p - 1] > v) {
    dist[p] = dist[p - 1];
    index[p] = index[p - 1];
    --p;
  }
  dist[p] = v;
  index[p] = j;
  return filled;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) knn_select_kernel(KnnArgs<T> a) {
  __shared__ Tile<T> sa, sb;
  __shared__ T candidates[kTile][kTile + 1];

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t grow = r0 + threadIdx.x / kLanesPerRow;
  // Scanner state: thread t < 32 keeps the list of query row r0 + t.
  const int64_t scan_row = r0 + threadIdx.x;
  const bool scanner = threadIdx.x < kTile && scan_row < a.n;
  T* list_dist = a.dist + scan_row * a.k;
  int64_t* list_index = a.index + scan_row * a.k;
  int filled = 0;
  T kth = T(INFINITY);

  for (int64_t c0 = 0; c0 < a.m; c0 += kTile) {
    T sq[kColsPerThread];
    centred_sq_distance_tile(a.x, a.n, r0, a.ref, a.m, c0, a.d, a.centre, a.x_norms, a.ref_norms, sa, sb, sq);
#pragma unroll
    for (int t = 0; t < kColsPerThread; ++t) {
      const int c = lane + kLanesPerRow * t;
      const int64_t col = c0 + c;
      const bool valid = col < a.m && !(a.exclude_self && col == grow);
      candidates[threadIdx.x / kLanesPerRow][c] = valid ? sq[t] : T(INFINITY);
    }
    __syncthreads();
    if (scanner) {
      for (int c = 0; c < kTile; ++c) {
        const T v = candidates[threadIdx.x][c];
        if (v < kth) {
          filled = insert_sorted(list_dist, list_index, a.k, filled, v, c0 + c);
          if (filled == a.k) kth = list_dist[a.k - 1];
        }
      }
    }
    __syncthreads();  // candidates are rewritten by the next tile
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) knn_refine_kernel(KnnArgs<T> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.n) return;  // whole warps leave together
  T* dist = a.dist + row * a.k;
  int64_t* index = a.index + row * a.k;
  const T* x = a.x + row * a.d;
  for (int j = 0; j < a.k; ++j) {
    const T* r = a.ref + index[j] * a.d;
    T s = 0;
    for (int i = lane; i < a.d; i += 32) {
      const T diff = x[i] - r[i];
      s += diff * diff;
    }
    s = warp_sum(s);
    if (lane == 0) dist[j] = sqrt(s);
  }
  if (lane == 0) {  // insertion sort by (distance, index); the list is nearly sorted already
    for (int j = 1; j < a.k; ++j) {
      const T v = dist[j];
      const int64_t idx = index[j];
      int p = j;
      while (p > 0 && (dist[p - 1] > v || (dist[p - 1] == v && index[p - 1] > idx))) {
        dist[p] = dist[p - 1];
        index[p] = index[p - 1];
        --p;
      }
      dist[p] = v;
      index[p] = idx;
    }
  }
}

template <typename T>
void launch_knn(const KnnParams& p, cudaStream_t stream) {
  require(p.n >= 0 && p.m >= 1 && p.d >= 1 && p.k >= 1, "knn: need n >= 0, m >= 1, d >= 1 and k >= 1");
  require(!p.exclude_self || p.n == p.m, "knn: exclude_self needs as many queries as references");
  const int64_t available = p.exclude_self ? p.m - 1 : p.m;
  require(p.k <= available, "knn: k must be at most " + std::to_string(available) + " (requested " +
                                std::to_string(p.k) + ")");
  if (p.n == 0) return;  // empty tensors have null data pointers
  require(p.x && p.ref && p.centre && p.dist && p.index && p.work, "knn: null input or output pointer");
  T* norms = static_cast<T*>(p.work);
  const KnnArgs<T> a{static_cast<const T*>(p.x), static_cast<const T*>(p.ref), static_cast<const T*>(p.centre),
                     norms, norms + p.n, static_cast<T*>(p.dist), p.index, p.n, p.m, p.d, p.k, p.exclude_self};
  launch_centred_sq_norms(a.x, a.n, a.d, a.centre, norms, stream);
  launch_centred_sq_norms(a.ref, a.m, a.d, a.centre, norms + p.n, stream);
  knn_select_kernel<T><<<blocks_for(p.n, kTile, "knn"), kThreads, 0, stream>>>(a);
  knn_refine_kernel<T><<<blocks_for(p.n, kWarpRowsPerBlock, "knn"), kThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "knn");
}

}  // namespace

void knn(const KnnParams& params, cudaStream_t stream) {
  dispatch(params.dtype, [&](auto zero) { launch_knn<decltype(zero)>(params, stream); });
}

}  // namespace hfc::cuda
