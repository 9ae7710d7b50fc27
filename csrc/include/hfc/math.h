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


namespace hfc {

// exp(x) for x <= 0 without branches or library calls, so loops over it auto-vectorise (the KDE inner loop).
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a polynomial for exp(r) and 2^n from the exponent bits.
// Inputs below the smallest normal exponent are clamped there (result ~1e-38 / ~1e-308, not 0): callers add these
// terms to a sum dominated by exp(0) = 1, where they vanish. Relative error ~1e-7 (float), ~1e-15 (double).
HFC_HD float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // (fmaxf would be a library call)
  const float n = rintf(x * 1.44269504088896341f);  // (floorf does not vectorise under -ftrapping-math)
  float r = fmaf(-n, 0.693359375f, x);
  r = fmaf(-n, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;  // Cephes expf minimax coefficients
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float y = fmaf(p, r * r, r) + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  return y * __int_as_float(bits);
#else
  return y * __builtin_bit_cast(float, bits);
#endif
}

HFC_HD double exp_nonpositive(double x) {
  x = x < -708.0 ? -708.0 : x;
  const double n = rint(x * 1.4426950408889634074);
  double r = fma(-n, 6.93145751953125e-1, x);
  r = fma(-n, 1.42860682030941723212e-6, r);
  double p = 1.0 / 6227020800.0;  // Taylor series of exp(r) to r^13: truncation < 2e-16 for |r| <= ln2/2
  const double inv_fact[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                             1.0 / 5040.0,      1.0 / 720.0,      1.0 / 120.0,      1.0 / 24.0,     1.0 / 6.0,
                             0.5,               1.0,              1.0};
  for (double c : inv_fact) p = fma(p, r, c);
  const long long bits = static_cast<long long>(n + 1023.0) << 52;
#if defined(__CUDA_ARCH__)
  return p * __longlong_as_double(bits);
#else
  return p * __builtin_bit_cast(double, bits);
#endif
}

}  // namespace hfc
