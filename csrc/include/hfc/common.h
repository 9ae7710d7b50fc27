// Shared helpers for the C++ CPU kernels: denormal control, OpenMP helpers, error type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace hfc {

// Sets flush-to-zero and denormals-are-zero for the current thread while alive, restoring the previous
// mode on exit. Near one-hot responsibilities underflow into the denormal range and make arithmetic on them
// several times slower; every kernel thread holds one of these.
class DenormalGuard {
 public:
  DenormalGuard() {
#if defined(__SSE__) || defined(__x86_64__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~DenormalGuard() {
#if defined(__SSE__) || defined(__x86_64__)
    _mm_setcsr(saved_);
#endif
  }
  DenormalGuard(const DenormalGuard&) = delete;
  DenormalGuard& operator=(const DenormalGuard&) = delete;

 private:
  unsigned int saved_ = 0;
};

// Thrown by kernels on invalid arguments; bound to Python ValueError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void require(bool ok, const std::string& message) {
  if (!ok) throw ArgumentError(message);
}

}  // namespace hfc

// ---------------------------------------------------------------------------------------------------------------
// Pairwise squared-distance tiles on centred data, shared by the k-NN (knn.cpp) and KDE (kde.cpp) kernels.
#include <cblas.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace hfc {

// C (m, n) = alpha * A (m, k) * B (n, k)^T + beta * C, row-major, leading dimensions k, k and ldc. One call to
// OpenBLAS; the module runs it single-threaded inside the kernels' OpenMP loops.
inline void gemm_abt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, const float* b, float beta,
                     float* c, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(n),
                    static_cast<blasint>(k), alpha, a, static_cast<blasint>(k), b, static_cast<blasint>(k), beta, c,
                    static_cast<blasint>(ldc));
}
inline void gemm_abt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, const double* b, double beta,
                     double* c, int64_t ldc) {
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(n),
                    static_cast<blasint>(k), alpha, a, static_cast<blasint>(k), b, static_cast<blasint>(k), beta, c,
                    static_cast<blasint>(ldc));
}

// A query set X (n, d) and a reference set R (m, d), both translated to the reference mean, with squared row norms.
// Distances are translation invariant; centring makes ||x||^2 + ||r||^2 - 2 x.r lose far less in float32 when
// the data sit far from the origin (the norms, and so the cancellation, shrink to the data's spread).
// Query rows per work item for the tiled kernels: at most max_tile, but small enough that every thread gets at least
// kMinTilesPerThread items (dynamic scheduling then evens out stragglers), and never below kMinQueryTile rows.
constexpr int64_t kMinTilesPerThread = 4;
constexpr int64_t kMinQueryTile = 32;
inline int64_t query_tile(int64_t n, int64_t max_tile, int threads) {
  const int64_t balanced = (n + kMinTilesPerThread * threads - 1) / (kMinTilesPerThread * threads);
  return std::max<int64_t>(1, std::min(max_tile, std::max(kMinQueryTile, balanced)));
}

// Kernel calls with fewer multiply-adds than this (k-NN/KDE: n m d, Mahalanobis: n d (d + C)) run on one thread:
// there a parallel region's fork/join and barriers cost more than they save, and far more on a loaded machine
// (measured under load at LID's minibatch shape 100 x 100 x 512: 6-218 ms on 2 threads vs 2-5 ms on one).
constexpr double kMinParallelMultiplyAdds = 1e7;

template <typename T>
struct CentredPairs {
  int64_t n, m, d;
  bool parallel;  // whether the kernels using these pairs open a parallel region (see kMinParallelMultiplyAdds)
  std::unique_ptr<T[]> x, ref, x_norm, ref_norm;  // uninitialised allocations: filled in parallel below

  CentredPairs(const T* x_in, int64_t n_, const T* ref_in, int64_t m_, int64_t d_)
      : n(n_),
        m(m_),
        d(d_),
        parallel(double(n_) * double(m_) * double(d_) >= kMinParallelMultiplyAdds),
        x(new T[n_ * d_]),
        ref(new T[m_ * d_]),
        x_norm(new T[n_]),
        ref_norm(new T[m_]) {
    std::vector<double> mean(d, 0.0);
#pragma omp parallel if (parallel)
    {
      std::vector<double> part(d, 0.0);
#pragma omp for schedule(static) nowait
      for (int64_t j = 0; j < m; ++j)
        for (int64_t c = 0; c < d; ++c) part[c] += ref_in[j * d + c];
#pragma omp critical
      for (int64_t c = 0; c < d; ++c) mean[c] += part[c];
    }
    std::vector<T> centre(d);
    for (int64_t c = 0; c < d; ++c) centre[c] = static_cast<T>(mean[c] / static_cast<double>(m > 0 ? m : 1));
    centre_rows(x_in, n, centre.data(), x.get(), x_norm.get());
    centre_rows(ref_in, m, centre.data(), ref.get(), ref_norm.get());
  }

  int threads() const { return parallel ? omp_get_max_threads() : 1; }

  // out[i * cols + j] = ||r_{r0+j}||^2 - 2 x_{q0+i} . r_{r0+j}; add x_norm[q0+i] for the squared distance.
  void partial_tile(int64_t q0, int64_t rows, int64_t r0, int64_t cols, T* out) const {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(out + i * cols, ref_norm.get() + r0, cols * sizeof(T));
    gemm_abt(rows, cols, d, T(-2), x.get() + q0 * d, ref.get() + r0 * d, T(1), out, cols);
  }

 private:
  void centre_rows(const T* in, int64_t rows, const T* centre, T* out, T* norm) const {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t i = 0; i < rows; ++i) {
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < d; ++c) {
        const T v = in[i * d + c] - centre[c];
        out[i * d + c] = v;
        s += double(v) * double(v);
      }
      norm[i] = static_cast<T>(s);
    }
  }
};

}  // namespace hfc
