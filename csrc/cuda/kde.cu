// Gaussian KDE log density, normalised as sklearn KernelDensity(kernel="gaussian"):
//   log p(x) = logsumexp_j(-||x - r_j||^2 / (2 h^2)) - hfc::kde_log_norm(d, M, h).
//
// Two launches on one stream: centred squared norms of queries and references (one warp per row, tiles.cuh), then
// a block owns 32 query rows and sweeps the references in tiles of 32. Each 32 x 32 tile of squared distances
// comes from the GEMM expansion on centred operands (centred_sq_distance_tile: both sides centred while staged in
// shared memory). Every thread folds its 4 columns of each tile into an online max-shifted logsumexp
// (hfc::OnlineLse, registers); at the end the 8 threads of a row merge their states with shuffles. Nothing of
// size N x M is stored.
#include "hfc/math.h"
#include "tiles.cuh"

namespace hfc::cuda {
namespace {

template <typename T>
struct KdeArgs {
  const T* x;
  const T* ref;
  const T* centre;
  const T* x_norms;
  const T* ref_norms;
  T* out;
  int64_t n;
  int64_t m;
  int d;
  T neg_inv_two_h2;  // -1 / (2 h^2)
  T log_norm;        // kde_log_norm(d, m, h)
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) kde_kernel(KdeArgs<T> a) {
  __shared__ Tile<T> sa, sb;

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t grow = r0 + threadIdx.x / kLanesPerRow;

  OnlineLse<T> lse;
  T scale, weight;  // rescaling factors reported by OnlineLse::add, unused here
  for (int64_t c0 = 0; c0 < a.m; c0 += kTile) {
    T sq[kColsPerThread];
    centred_sq_distance_tile(a.x, a.n, r0, a.ref, a.m, c0, a.d, a.centre, a.x_norms, a.ref_norms, sa, sb, sq);
#pragma unroll
    for (int t = 0; t < kColsPerThread; ++t) {
      if (c0 + lane + kLanesPerRow * t < a.m) lse.add(sq[t] * a.neg_inv_two_h2, scale, weight);
    }
  }
  // Merge the row's 8 partial states: add the other lane's total exp(max + log sum) as one term.
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
    const T other_max = __shfl_xor_sync(0xffffffffu, lse.max, offset);
    const T other_sum = __shfl_xor_sync(0xffffffffu, lse.sum, offset);
    if (other_sum > T(0)) lse.add(other_max + log(other_sum), scale, weight);
  }
  if (lane == 0 && grow < a.n) a.out[grow] = lse.value() - a.log_norm;
}

template <typename T>
void launch_kde(const KdeParams& p, cudaStream_t stream) {
  require(p.n >= 0 && p.m >= 1 && p.d >= 1, "kde: need n >= 0, m >= 1 and d >= 1");
  require(std::isfinite(p.bandwidth) && p.bandwidth > 0, "kde: bandwidth must be positive and finite");
  require(p.m <= 0x7fffffff, "kde: at most 2^31 - 1 references");
  if (p.n == 0) return;  // empty tensors have null data pointers
  require(p.x && p.ref && p.centre && p.out && p.work, "kde: null input or output pointer");
  T* norms = static_cast<T*>(p.work);
  const KdeArgs<T> a{static_cast<const T*>(p.x),
                     static_cast<const T*>(p.ref),
                     static_cast<const T*>(p.centre),
                     norms,
                     norms + p.n,
                     static_cast<T*>(p.out),
                     p.n,
                     p.m,
                     p.d,
                     static_cast<T>(-0.5 / (p.bandwidth * p.bandwidth)),
                     static_cast<T>(kde_log_norm<double>(p.d, static_cast<int>(p.m), p.bandwidth))};
  launch_centred_sq_norms(a.x, a.n, a.d, a.centre, norms, stream);
  launch_centred_sq_norms(a.ref, a.m, a.d, a.centre, norms + p.n, stream);
  kde_kernel<T><<<blocks_for(p.n, kTile, "kde"), kThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "kde");
}

}  // namespace

void kde(const KdeParams& params, cudaStream_t stream) {
  dispatch(params.dtype, [&](auto zero) { launch_kde<decltype(zero)>(params, stream); });
}

}  // namespace hfc::cuda
