// Scalar math shared by the C++ CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
// Everything here is header-only and callable from host and device code.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define HFC_HD __host__ __device__ __forceinline__
#else
#define HFC_HD inline
#endif

namespace hfc {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// Online (max-shifted) log-sum-exp state: value = max + log(sum). Adding a term t rescales the running sum
// by exp(old_max - new_max); `scale_old`/`weight_new` are returned so callers can rescale accumulators
// (e.g. the responsibility-weighted gradient) in the same pass.
template <typename T>
struct OnlineLse {
  T max = -INFINITY;
  T sum = 0;

  // Adds exp(t); sets scale_old = factor for previously accumulated terms, weight_new = factor for the new one.
  HFC_HD void add(T t, T& scale_old, T& weight_new) {
    if (t > max) {
      scale_old = (max == -INFINITY) ? T(0) : exp(max - t);
      weight_new = T(1);
      sum = sum * scale_old + T(1);
      max = t;
    } else {
      scale_old = T(1);
      weight_new = exp(t - max);
      sum += weight_new;
    }
  }
  HFC_HD T value() const { return max + log(sum); }
};

// Gaussian KDE normalisation (sklearn KernelDensity, kernel="gaussian"): log density = lse - this.
template <typename T>
HFC_HD T kde_log_norm(int dim, int n_ref, T bandwidth) {
  return log(T(n_ref)) + T(0.5) * T(dim) * (T(kLog2Pi) + T(2) * log(bandwidth));
}

// LID maximum-likelihood estimate from k ascending distances: -(1/k sum_i log(r_i / r_k))^-1.
// Zero distances (duplicates) contribute log(tiny) and give a small positive LID rather than NaN.
template <typename T>
HFC_HD T lid_from_sorted(const T* dist, int k) {
  const T r_k = dist[k - 1];
  T acc = 0;
  for (int i = 0; i < k; ++i) acc += log(fmax(dist[i], T(1e-30)) / fmax(r_k, T(1e-30)));
  return acc == T(0) ? T(INFINITY) : -T(k) / acc;
}

}  // namespace hfc
