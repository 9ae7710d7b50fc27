// Fused multi-layer GMM log-likelihood (or nearest-component distance) and its gradient w.r.t. the input.
//
// Tiling: one launch covers every layer; the grid is the concatenation of each layer's row tiles (32 rows of x per
// block, thread layout in tiles.cuh) and a block finds its layer by binary search over the tiles' prefix sums. A
// block walks the K components of its layer; for component k it
//   1. forms y = (x - mu_k) U_k one 32-column tile at a time (x centred while it is staged in shared memory, only
//      the tiles of U_k on or above the diagonal), writes y to a per-layer (N, d) scratch when a gradient is
//      wanted and reduces q = ||y||^2 per row;
//   2. updates the row's online (max-shifted) logsumexp of logp_k = log_norm_k - q / 2 (hfc::OnlineLse, kept in
//      registers of the row's first thread), which yields the factor `scale` for the gradient accumulated so far
//      and the factor `weight` for component k's gradient;
//   3. forms g = y U_k^T (the transposed triangular product, tiles of U_k at or right of the diagonal) and
//      accumulates grad = scale * grad + weight * g directly in the output; the step is skipped when no row of
//      the tile changes (weight 0 and scale 1, i.e. a component far less likely than the best so far).
// loglik mode: weight = -exp(logp_k - max), and grad is divided by the final sum at the end, so grad =
// -sum_k r_k y_k U_k^T with responsibilities r_k; no N x K x d intermediate is stored. nearest mode: when k becomes
// the most likely component, scale = 0 and weight = 2 (grad = 2 y_k* U_k*^T), else scale = 1 and weight = 0.
#include "hfc/math.h"
#include "tiles.cuh"

namespace hfc::cuda {
namespace {

template <typename T>
struct GmmEntry {
  const T* x;
  const T* means;
  const T* prec_chol;
  const T* log_norm;
  T* value;
  T* grad;  // null: no gradient
  T* work;
  int64_t* component;
  int64_t n;
  int d;
  int k;
  int64_t tile_begin;  // first block of this layer
};

// One 32-column tile of g = y U^T for rows r0.. of y (n, d): g[r, i] = sum_{j >= i} y[r, j] U[i, j] for
// i = i0 + col0 + 8 m; U is staged transposed and only its tiles at or right of the diagonal are visited.
template <typename T>
__device__ void upper_transposed_product(const T* y, int64_t n, int d, int64_t r0, const T* u, int i0, Tile<T>& sa,
                                         Tile<T>& sb, T (&acc)[kColsPerThread]) {
#pragma unroll
  for (int m = 0; m < kColsPerThread; ++m) acc[m] = T(0);
  for (int j0 = i0; j0 < d; j0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t row = r0 + r;
      const int j = j0 + c, ui = i0 + r;
      sa[r][c] = (row < n && j < d) ? y[row * d + j] : T(0);
      sb[c][r] = (ui < d && j < d && ui <= j) ? u[static_cast<int64_t>(ui) * d + j] : T(0);  // sb[j][i] = U[i][j]
    }
    __syncthreads();
    multiply_tiles(sa, sb, acc);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gmm_kernel(const GmmEntry<T>* entries, int count, bool nearest) {
  __shared__ Tile<T> sa, sb;
  __shared__ T row_scale[kTile];   // factor for the gradient accumulated so far
  __shared__ T row_weight[kTile];  // factor for the current component's gradient

  const GmmEntry<T> e = entries[find_entry(entries, count)];
  const int d = e.d;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) - e.tile_begin) * kTile;
  const int row = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int64_t grow = r0 + row;
  const bool owner = lane == 0 && grow < e.n;  // keeps the row's logsumexp state
  const bool need_grad = e.grad != nullptr;

  OnlineLse<T> lse;
  T best_q = 0;
  int64_t best_k = 0;
  for (int k = 0; k < e.k; ++k) {
    const T* mu = e.means + static_cast<int64_t>(k) * d;
    const T* u = e.prec_chol + static_cast<int64_t>(k) * d * d;

    // 1. y = (x - mu_k) U_k and q = ||y||^2.
    T q = 0;
    for (int j0 = 0; j0 < d; j0 += kTile) {
      T y[kColsPerThread];
      centred_upper_product(e.x, e.n, d, r0, mu, u, j0, sa, sb, y);
#pragma unroll
      for (int m = 0; m < kColsPerThread; ++m) {
        const int j = j0 + lane + kLanesPerRow * m;
        q += y[m] * y[m];  // zero outside the matrix
        if (need_grad && grow < e.n && j < d) e.work[grow * d + j] = y[m];
      }
    }
    q = row_sum(q);

    // 2. Online logsumexp over components; gradient factors for step 3.
    bool changes = false;
    if (owner) {
      const T t = e.log_norm[k] - q / T(2);
      const bool improved = t > lse.max;  // first maximum wins ties, as argmax
      T scale, weight;
      lse.add(t, scale, weight);
      if (improved) {
        best_k = k;
        best_q = q;
      }
      if (nearest) {
        scale = improved ? T(0) : T(1);
        weight = improved ? T(2) : T(0);
      } else {
        weight = -weight;
      }
      row_scale[row] = scale;
      row_weight[row] = weight;
      changes = weight != T(0) || scale != T(1);
    }
    // Also the barrier that publishes `work` and the factors to the whole block.
    const bool any_change = __syncthreads_or(changes);

    // 3. grad = scale * grad + weight * y U_k^T.
    if (need_grad && any_change) {
      const T scale = row_scale[row], weight = row_weight[row];
      for (int i0 = 0; i0 < d; i0 += kTile) {
        T g[kColsPerThread];
        upper_transposed_product(e.work, e.n, d, r0, u, i0, sa, sb, g);
#pragma unroll
        for (int m = 0; m < kColsPerThread; ++m) {
          const int i = i0 + lane + kLanesPerRow * m;
          if (grow < e.n && i < d) {
            T* p = e.grad + grow * d + i;
            *p = (scale == T(0) ? T(0) : scale * *p) + weight * g[m];  // never reads uninitialised output * 0
          }
        }
      }
    }
  }

  if (owner) {
    e.value[grow] = nearest ? best_q : lse.value();
    e.component[grow] = best_k;
  }
  if (need_grad && !nearest) {  // responsibilities: divide by the logsumexp's sum
    __syncthreads();            // every thread is done reading row_scale
    if (owner) row_scale[row] = T(1) / lse.sum;
    __syncthreads();
    if (grow < e.n) {
      const T inv = row_scale[row];
      for (int i = lane; i < d; i += kLanesPerRow) e.grad[grow * d + i] *= inv;
    }
  }
}

template <typename T>
void launch_gmm(const GmmParams& params, const std::vector<GmmLayer>& layers, cudaStream_t stream) {
  std::vector<GmmEntry<T>> entries;
  int64_t tiles = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const GmmLayer& layer = layers[l];
    const std::string where = "gmm layer " + std::to_string(l) + ": ";
    require(layer.n >= 0 && layer.d >= 1 && layer.k >= 1, where + "need n >= 0, d >= 1 and k >= 1");
    if (layer.n == 0) continue;  // empty tensors have null data pointers
    require(layer.x && layer.means && layer.prec_chol && layer.log_norm && layer.value && layer.component,
            where + "null input or output pointer");
    require(layer.grad == nullptr || layer.work != nullptr, where + "a gradient needs the work buffer");
    entries.push_back({static_cast<const T*>(layer.x), static_cast<const T*>(layer.means),
                       static_cast<const T*>(layer.prec_chol), static_cast<const T*>(layer.log_norm),
                       static_cast<T*>(layer.value), static_cast<T*>(layer.grad), static_cast<T*>(layer.work),
                       layer.component, layer.n, layer.d, layer.k, tiles});
    tiles += (layer.n + kTile - 1) / kTile;
  }
  if (entries.empty()) return;
  const unsigned int blocks = blocks_for(tiles, 1, "gmm");
  DeviceArray<GmmEntry<T>> device_entries(entries, stream, "gmm");
  gmm_kernel<T><<<blocks, kThreads, 0, stream>>>(device_entries.get(), static_cast<int>(entries.size()),
                                                 params.nearest);
  check(cudaGetLastError(), "gmm");
}

}  // namespace

void gmm(const GmmParams& params, const std::vector<GmmLayer>& layers, cudaStream_t stream) {
  dispatch(params.dtype, [&](auto zero) { launch_gmm<decltype(zero)>(params, layers, stream); });
}

}  // namespace hfc::cuda
