// Building blocks shared by the CUDA kernels in this directory: thread layout, shared-memory tile products,
// warp reductions, host-side error checking, dtype dispatch and the upload of per-layer parameter arrays.
//
// Thread layout of every tile kernel: a block of kThreads = 256 threads owns kTile = 32 rows of the left operand.
// Thread t works on row t / 8 and on the 4 output columns (t % 8) + 8 m, m = 0..3, of a 32 x 32 output tile, so
// the 8 threads of one row are 8 consecutive lanes of one warp and reduce across the row with three shuffles.
// Operands are staged in two shared 32 x 33 tiles (the padding column avoids bank conflicts, also when a tile is
// written transposed); each inner step reads one broadcast value of the left tile and 4 values of the right one.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "hfc/cuda_ops.h"

namespace hfc::cuda {
namespace {  // internal linkage: every .cu file gets its own copy of these kernels and helpers

constexpr int kTile = 32;
constexpr int kThreads = 256;
constexpr int kLanesPerRow = kThreads / kTile;          // 8 threads share one row
constexpr int kColsPerThread = kTile / kLanesPerRow;    // 4 output columns per thread
constexpr int kWarpRowsPerBlock = kThreads / 32;        // row-per-warp kernels: rows handled by one block
// __launch_bounds__(kThreads, kMinBlocks) on the tile kernels: without the second argument nvcc 13 caps them at
// 64-80 registers and spills; two resident blocks (<= 128 registers) keep everything in registers.
constexpr int kMinBlocks = 2;

template <typename T>
using Tile = T[kTile][kTile + 1];

// ------------------------------------------------------------------------------------------------------------
// Host side.

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Calls f(T{}) with T = float or double according to dtype.
template <typename F>
void dispatch(DType dtype, F&& f) {
  if (dtype == DType::kFloat64) {
    f(double{});
  } else {
    f(float{});
  }
}

inline unsigned int blocks_for(int64_t items, int64_t per_block, const char* what) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  require(blocks <= 0x7fffffff, std::string(what) + ": too many rows for one launch");
  return static_cast<unsigned int>(blocks);
}

// A stream-ordered device copy of a host array (the per-layer parameters of a fused multi-layer launch).
// cudaMemcpyAsync from pageable memory has staged the data when it returns, so `host` may die right after.
template <typename E>
class DeviceArray {
 public:
  DeviceArray(const std::vector<E>& host, cudaStream_t stream, const char* what) : stream_(stream) {
    const size_t bytes = host.size() * sizeof(E);
    check(cudaMallocAsync(reinterpret_cast<void**>(&ptr_), bytes, stream), what);
    check(cudaMemcpyAsync(ptr_, host.data(), bytes, cudaMemcpyHostToDevice, stream), what);
  }
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  const E* get() const { return ptr_; }

 private:
  E* ptr_ = nullptr;
  cudaStream_t stream_;
};

// ------------------------------------------------------------------------------------------------------------
// Device side.

// Index of the entry whose tiles contain this block: the last e with entries[e].tile_begin <= blockIdx.x.
template <typename Entry>
__device__ int find_entry(const Entry* entries, int count) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (entries[mid].tile_begin <= static_cast<int64_t>(blockIdx.x)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sum over the 8 lanes of one row (every lane gets the total).
template <typename T>
__device__ T row_sum(T v) {
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// acc[m] += sum_i a[row][i] * b[i][col0 + 8 m] for this thread's row and columns.
template <typename T>
__device__ void multiply_tiles(const Tile<T>& a, const Tile<T>& b, T (&acc)[kColsPerThread]) {
  const int row = threadIdx.x / kLanesPerRow, col0 = threadIdx.x % kLanesPerRow;
#pragma unroll 8
  for (int i = 0; i < kTile; ++i) {
    const T av = a[row][i];
#pragma unroll
    for (int m = 0; m < kColsPerThread; ++m) acc[m] += av * b[i][col0 + kLanesPerRow * m];
  }
}

// One 32-column tile of y = (x - mu) U for rows r0 .. r0+31 of x (n, d), U (d, d) upper-triangular:
// y[r, j] = sum_{i <= j} (x[r, i] - mu[i]) U[i, j] for j = j0 + col0 + 8 m. x is centred while it is loaded, and
// only the row tiles of U on or above the diagonal tile are visited (i0 <= j0); entries of U below the diagonal
// are read as zero. Rows >= n and columns >= d come out as zero.
template <typename T>
__device__ void centred_upper_product(const T* x, int64_t n, int d, int64_t r0, const T* mu, const T* u, int j0,
                                      Tile<T>& sa, Tile<T>& sb, T (&acc)[kColsPerThread]) {
#pragma unroll
  for (int m = 0; m < kColsPerThread; ++m) acc[m] = T(0);
  for (int i0 = 0; i0 <= j0; i0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t row = r0 + r;
      const int i = i0 + c, ui = i0 + r, j = j0 + c;
      sa[r][c] = (row < n && i < d) ? x[row * d + i] - mu[i] : T(0);
      sb[r][c] = (ui < d && j < d && ui <= j) ? u[static_cast<int64_t>(ui) * d + j] : T(0);
    }
    __syncthreads();
    multiply_tiles(sa, sb, acc);
    __syncthreads();
  }
}

// Squared distances ||x_r - ref_c||^2 for rows r0.. of x and columns c0 + col0 + 8 m of ref by the GEMM
// expansion on centred operands: norms[r] + ref_norms[c] - 2 (x_r - centre).(ref_c - centre), clamped at 0.
// x_norms/ref_norms hold the centred squared norms (centred_sq_norms_kernel). Invalid rows/columns give junk.
template <typename T>
__device__ void centred_sq_distance_tile(const T* x, int64_t n, int64_t r0, const T* ref, int64_t m, int64_t c0,
                                         int d, const T* centre, const T* x_norms, const T* ref_norms, Tile<T>& sa,
                                         Tile<T>& sb, T (&sq)[kColsPerThread]) {
  T dot[kColsPerThread] = {};
  for (int i0 = 0; i0 < d; i0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile, i = i0 + c;
      const int64_t row = r0 + r, col = c0 + r;
      sa[r][c] = (row < n && i < d) ? x[row * d + i] - centre[i] : T(0);
      sb[c][r] = (col < m && i < d) ? ref[col * d + i] - centre[i] : T(0);  // transposed: sb[feature][reference]
    }
    __syncthreads();
    multiply_tiles(sa, sb, dot);
    __syncthreads();
  }
  const int64_t row = r0 + threadIdx.x / kLanesPerRow;
  const T x_norm = row < n ? x_norms[row] : T(0);
#pragma unroll
  for (int t = 0; t < kColsPerThread; ++t) {
    const int64_t col = c0 + threadIdx.x % kLanesPerRow + kLanesPerRow * t;
    const T ref_norm = col < m ? ref_norms[col] : T(0);
    sq[t] = fmax(x_norm + ref_norm - T(2) * dot[t], T(0));
  }
}

// out[r] = ||a_r - centre||^2, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) centred_sq_norms_kernel(const T* a, int64_t rows, int d, const T* centre,
                                                                    T* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  T s = 0;
  for (int i = lane; i < d; i += 32) {
    const T v = a[row * d + i] - centre[i];
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) out[row] = s;
}

template <typename T>
void launch_centred_sq_norms(const T* a, int64_t rows, int d, const T* centre, T* out, cudaStream_t stream) {
  if (rows == 0) return;
  centred_sq_norms_kernel<T>
      <<<blocks_for(rows, kWarpRowsPerBlock, "norms"), kThreads, 0, stream>>>(a, rows, d, centre, out);
}

}  // namespace
}  // namespace hfc::cuda
