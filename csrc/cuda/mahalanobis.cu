// Fused multi-layer squared Mahalanobis distances to C class means under one tied precision per layer.
//
// With P = U U^T (U upper-triangular, from the caller) and a centre c near the data, (x - mu)^T P (x - mu) =
// ||z - p||^2 with z = (x - c) U and p = (mu - c) U (the projected means, from the caller): direct differences in
// the projected space, no cancellation-prone expansion.
//
// Tiling: one launch covers every layer; the grid is the concatenation of each layer's row tiles (32 rows of x per
// block, thread layout in tiles.cuh), a block finds its layer by binary search over the tiles' prefix sums. The
// block forms z one 32-column tile at a time (centred_upper_product: x centred while staged in shared memory,
// only the tiles of U on or above the diagonal), then for every class adds that tile's sum of (z - p_c)^2 to
// out[row, c]; the row's 8 threads reduce with shuffles and class c is owned by lane c % 8, so each output
// element has one writer and a fixed summation order.
#include "tiles.cuh"

namespace hfc::cuda {
namespace {

template <typename T>
struct MahalanobisEntry {
  const T* x;
  const T* centre;
  const T* factor;
  const T* proj_means;
  T* out;
  int64_t n;
  int d;
  int c;
  int64_t tile_begin;  // first block of this layer
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    mahalanobis_kernel(const MahalanobisEntry<T>* entries, int count) {
  __shared__ Tile<T> sa, sb;

  const MahalanobisEntry<T> e = entries[find_entry(entries, count)];
  const int d = e.d;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) - e.tile_begin) * kTile;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t grow = r0 + threadIdx.x / kLanesPerRow;

  for (int j0 = 0; j0 < d; j0 += kTile) {
    T z[kColsPerThread];
    centred_upper_product(e.x, e.n, d, r0, e.centre, e.factor, j0, sa, sb, z);
    for (int cls = 0; cls < e.c; ++cls) {
      const T* p = e.proj_means + static_cast<int64_t>(cls) * d;
      T s = 0;
#pragma unroll
      for (int m = 0; m < kColsPerThread; ++m) {
        const int j = j0 + lane + kLanesPerRow * m;
        if (j < d) {
          const T diff = z[m] - p[j];
          s += diff * diff;
        }
      }
      s = row_sum(s);
      if (lane == cls % kLanesPerRow && grow < e.n) {
        T* out = e.out + grow * e.c + cls;
        *out = (j0 == 0 ? T(0) : *out) + s;
      }
    }
  }
}

template <typename T>
void launch_mahalanobis(const std::vector<MahalanobisLayer>& layers, cudaStream_t stream) {
  std::vector<MahalanobisEntry<T>> entries;
  int64_t tiles = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const MahalanobisLayer& layer = layers[l];
    const std::string where = "mahalanobis layer " + std::to_string(l) + ": ";
    require(layer.n >= 0 && layer.d >= 1 && layer.c >= 1, where + "need n >= 0, d >= 1 and c >= 1");
    if (layer.n == 0) continue;  // empty tensors have null data pointers
    require(layer.x && layer.centre && layer.factor && layer.proj_means && layer.out,
            where + "null input or output pointer");
    entries.push_back({static_cast<const T*>(layer.x), static_cast<const T*>(layer.centre),
                       static_cast<const T*>(layer.factor), static_cast<const T*>(layer.proj_means),
                       static_cast<T*>(layer.out), layer.n, layer.d, layer.c, tiles});
    tiles += (layer.n + kTile - 1) / kTile;
  }
  if (entries.empty()) return;
  const unsigned int blocks = blocks_for(tiles, 1, "mahalanobis");
  DeviceArray<MahalanobisEntry<T>> device_entries(entries, stream, "mahalanobis");
  mahalanobis_kernel<T><<<blocks, kThreads, 0, stream>>>(device_entries.get(), static_cast<int>(entries.size()));
  check(cudaGetLastError(), "mahalanobis");
}

}  // namespace

void mahalanobis(DType dtype, const std::vector<MahalanobisLayer>& layers, cudaStream_t stream) {
  dispatch(dtype, [&](auto zero) { launch_mahalanobis<decltype(zero)>(layers, stream); });
}

}  // namespace hfc::cuda
