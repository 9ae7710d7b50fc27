// CPU implementation of hfc/gmm.h: OpenMP over (layer, row-tile) work items; triangular products by OpenBLAS
// trmm, or for d <= simd_max_dim by register-blocked SIMD code on packed factors (gmm_pack).
//
// Per tile and component k: Y = X - mu_k (centred while loading), Y := Y U_k (d^2/2 multiply-adds per row),
// q = row norms of Y, logp = log_norm_k - q/2, online logsumexp update per row; for the gradient the rows of Y
// are scaled by their new-term weight and Y U_k^T (triangular again) is added to the rescaled accumulator.
// Both triangular products together cost one tile x d x d GEMM, so a whole call costs about one
// N x d x (K d) GEMM, with O(tile x d) memory per thread and no N x K x d intermediate.
#include "hfc/gmm.h"

#include <omp.h>

#include <algorithm>
#include <cblas.h>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "hfc/common.h"
#include "hfc/math.h"

namespace hfc {
namespace {

// B := B * op(U) for row-major B (m, n) and upper-triangular U (n, n).
inline void trmm_right_upper(bool transpose, int64_t m, int64_t n, const float* u, float* b) {
  scipy_cblas_strmm(CblasRowMajor, CblasRight, CblasUpper, transpose ? CblasTrans : CblasNoTrans, CblasNonUnit,
                    static_cast<blasint>(m), static_cast<blasint>(n), 1.0f, u, static_cast<blasint>(n), b,
                    static_cast<blasint>(n));
}
inline void trmm_right_upper(bool transpose, int64_t m, int64_t n, const double* u, double* b) {
  scipy_cblas_dtrmm(CblasRowMajor, CblasRight, CblasUpper, transpose ? CblasTrans : CblasNoTrans, CblasNonUnit,
                    static_cast<blasint>(m), static_cast<blasint>(n), 1.0, u, static_cast<blasint>(n), b,
                    static_cast<blasint>(n));
}

// A component whose weight (relative to the running maximum) is below this for every row of a tile adds less
// than eps^3 of the dominant term to the gradient, so its second triangular product is skipped.
template <typename T>
constexpr T negligible_weight() {
  return std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon();
}

struct WorkItem {
  int64_t layer, row0, rows;
  double cost;
};

// ---- SIMD path: register-blocked triangular products on packed factors ----------------------------------------

// Vector width and rows per register block follow the target ISA: 2 column vectors x kMicroRows accumulators
// plus the loaded vectors must fit the register file (32 zmm with AVX-512, 16 ymm with AVX2), or the block spills
// to the stack and runs ~20x slower (measured: 512-bit generic vectors on an AVX2-only EPYC).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int64_t kMicroRows = 8;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int64_t kMicroRows = 6;
#else
constexpr int kVectorBytes = 16;
constexpr int64_t kMicroRows = 6;
#endif

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVectorBytes), aligned(sizeof(T)), may_alias));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  static constexpr int64_t kStrip = 2 * kLanes;  // columns of one packed strip (two vectors)
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// acc[v][r] += a[r, i] * b[i, v] for i in [0, count), r < kMicroRows (a: row stride lda), v < NB: per i, NB
// vector loads of the packed strip b (row stride kStrip) feed NB * kMicroRows FMAs.
template <typename T, int NB>
inline void fma_rows(typename Simd<T>::vec (&acc)[NB][kMicroRows], const T* a, int64_t lda, const T* b,
                     int64_t count) {
  using V = typename Simd<T>::vec;
  constexpr int64_t kL = Simd<T>::kLanes, kS = Simd<T>::kStrip;
  for (int64_t i = 0; i < count; ++i) {
    V bv[NB];
    for (int v = 0; v < NB; ++v) bv[v] = *reinterpret_cast<const V*>(b + i * kS + v * kL);
    for (int64_t r = 0; r < kMicroRows; ++r) {
      const T ar = a[r * lda + i];
      for (int v = 0; v < NB; ++v) acc[v][r] += ar * bv[v];
    }
  }
}

// Rows of a packed strip are consumed in chunks of this many bytes (see rows_times_factor).
constexpr int64_t kStripChunkBytes = 16384;

// Rows [lo, hi) of one packed strip (columns [j0, j0 + kStrip) of a triangular factor; strip row i = factor row i,
// offset by begin) times every row block of a, combined into those columns of out (both row stride ld):
// out = acc (kUpper: y = z U) or out = out * scale + weight * acc (the gradient accumulator, U^T), where a chunk
// other than the strip's first (`first` false) adds to out. The zeros of the strip's diagonal block are
// multiplied like the rest (one branch-free loop); the zero blocks outside the strip's rows are never visited,
// which halves the multiply-adds. kVectors = 1 for a last strip of at most one vector.
template <typename T, bool kUpper, int kVectors>
void strip_times_rows(const T* a, int64_t rows, int64_t ld, const T* strip, int64_t j0, int64_t begin, int64_t lo,
                      int64_t hi, bool first, T* out, const T* scale, const T* weight) {
  using V = typename Simd<T>::vec;
  constexpr int64_t kL = Simd<T>::kLanes, kS = Simd<T>::kStrip;
  const T* b = strip + (lo - begin) * kS;
  for (int64_t r0 = 0; r0 < rows; r0 += kMicroRows) {
    V acc[kVectors][kMicroRows];
    for (int v = 0; v < kVectors; ++v) {
      for (int64_t r = 0; r < kMicroRows; ++r) acc[v][r] = V{};
    }
    fma_rows<T, kVectors>(acc, a + r0 * ld + lo, ld, b, hi - lo);
    for (int v = 0; v < kVectors; ++v) {
      for (int64_t r = 0; r < kMicroRows; ++r) {
        V* o = reinterpret_cast<V*>(out + (r0 + r) * ld + j0 + v * kL);
        if constexpr (kUpper) {
          *o = first ? acc[v][r] : *o + acc[v][r];
        } else {
          *o = (first ? *o * scale[r0 + r] : *o) + acc[v][r] * weight[r0 + r];
        }
      }
    }
  }
}

// a (rows x d, row stride ld, rows a multiple of kMicroRows) times one component's triangular factor (its packed
// strips: `component` + strip_offset[s]), combined into out (row stride ld): out = a U (upper) or
// out = out * scale + weight * (a U^T) per row (lower: the gradient accumulator). Loops run chunk of factor rows
// (outer), strip, row block (inner), so a chunk of a stays in cache across all strips and each strip chunk is
// loaded once and reused by every row block.
template <typename T>
void rows_times_factor(const T* a, int64_t rows, int64_t ld, const T* component,
                       const std::vector<int64_t>& strip_offset, int64_t d, bool upper, T* out,
                       const T* scale = nullptr, const T* weight = nullptr) {
  constexpr int64_t kL = Simd<T>::kLanes, kS = Simd<T>::kStrip;
  constexpr int64_t kChunk = kStripChunkBytes / (kS * static_cast<int64_t>(sizeof(T)));
  const int64_t strips = (d + kS - 1) / kS;
  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t j0 = s * kS;
      const int64_t begin = upper ? 0 : j0, end = upper ? std::min(d, j0 + kS) : d;
      const int64_t lo = std::max(begin, c0), hi = std::min(end, c0 + kChunk);
      if (lo >= hi) continue;
      const T* strip = component + strip_offset[s];
      const bool first = lo == begin, two = j0 + kL < d;
      if (upper && two) {
        strip_times_rows<T, true, 2>(a, rows, ld, strip, j0, begin, lo, hi, first, out, scale, weight);
      } else if (upper) {
        strip_times_rows<T, true, 1>(a, rows, ld, strip, j0, begin, lo, hi, first, out, scale, weight);
      } else if (two) {
        strip_times_rows<T, false, 2>(a, rows, ld, strip, j0, begin, lo, hi, first, out, scale, weight);
      } else {
        strip_times_rows<T, false, 1>(a, rows, ld, strip, j0, begin, lo, hi, first, out, scale, weight);
      }
    }
  }
}

// Packed layout of one component (see gmm_pack): the strips of U, then the strips of U^T. Strip s covers columns
// [s kStrip, (s+1) kStrip) and holds only its nonzero rows, contiguous with row stride kStrip, so a strip streams
// from cache and every row block of a tile reuses it.
template <typename T>
struct PackedLayout {
  int64_t strips = 0;
  std::vector<int64_t> upper, lower;  // per strip: offset within a component; upper[strips] = start of U^T
  int64_t component = 0;              // elements per component

  explicit PackedLayout(int64_t d) : strips((d + Simd<T>::kStrip - 1) / Simd<T>::kStrip) {
    constexpr int64_t kS = Simd<T>::kStrip;
    upper.assign(strips + 1, 0);
    lower.assign(strips + 1, 0);
    for (int64_t s = 0; s < strips; ++s) upper[s + 1] = upper[s] + std::min(d, (s + 1) * kS) * kS;
    lower[0] = upper[strips];
    for (int64_t s = 0; s < strips; ++s) lower[s + 1] = lower[s] + (d - s * kS) * kS;
    component = lower[strips];
  }

  void pack_all(const T* prec_chol, int64_t d, int64_t k, T* out) const {  // k components of (d, d)
    for (int64_t c = 0; c < k; ++c) pack(prec_chol + c * d * d, d, out + c * component);
  }

  void pack(const T* u, int64_t d, T* out) const {  // one component; only the upper triangle of U is read
    constexpr int64_t kS = Simd<T>::kStrip;
    std::fill(out, out + component, T(0));
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t j0 = s * kS, j1 = std::min(d, j0 + kS);
      T* up = out + upper[s];
      T* lo = out + lower[s];
      for (int64_t i = 0; i < j1; ++i) {
        for (int64_t j = std::max(i, j0); j < j1; ++j) up[i * kS + j - j0] = u[i * d + j];  // U[i, j], j >= i
      }
      for (int64_t i = j0; i < d; ++i) {
        for (int64_t j = j0; j < std::min(i + 1, j1); ++j) lo[(i - j0) * kS + j - j0] = u[j * d + i];  // U[j, i]
      }
    }
  }
};

// How one layer's factors are applied: OpenBLAS trmm on U (ld = d), or the SIMD path on packed factors (the
// caller's from gmm_pack, or packed here once per call). ld is the row stride of the per-thread scratch rows; the
// SIMD path's has a spare vector, so rows 2^n bytes apart do not compete for the same cache sets.
template <typename T>
struct Factors {
  bool simd = false;
  int64_t ld = 0;
  PackedLayout<T> layout;
  std::vector<T> owned;     // packed here when the caller passed none
  const T* packed = nullptr;

  // Packing here costs O(K d^2) memory traffic per call, which dominates calls with few rows: callers that reuse
  // a mixture pass GmmLayer::packed from gmm_pack instead.
  Factors(const GmmLayer<T>& L, bool use_simd)
      : simd(use_simd),
        ld(use_simd ? round_up(L.d, Simd<T>::kLanes) + Simd<T>::kLanes : L.d),
        layout(use_simd ? L.d : 0) {
    if (!simd) return;
    if (!L.packed) {
      owned.resize(L.k * layout.component);
      layout.pack_all(L.prec_chol, L.d, L.k, owned.data());
    }
    packed = L.packed ? L.packed : owned.data();
  }
  const T* component(int64_t k) const { return packed + k * layout.component; }
};

// Per-thread scratch, grown to the largest (tile rounded up to kMicroRows) x row stride of a call.
template <typename T>
struct Workspace {
  std::vector<T> y, acc, best_y, z;  // z: the centred rows, left operand of the SIMD path's first product
  std::vector<T> q, scale_old, weight_new, best_logp, best_q;
  std::vector<OnlineLse<T>> lse;
  std::vector<int64_t> best_k, group;

  void reserve(int64_t tile, int64_t max_ld, int64_t max_simd_ld, bool nearest) {
    const int64_t padded = round_up(tile, kMicroRows);
    for (auto* v : {&y, &acc}) grow(*v, padded * max_ld);
    grow(z, padded * max_simd_ld);
    if (nearest) grow(best_y, tile * max_ld);
    for (auto* v : {&q, &scale_old, &weight_new, &best_logp, &best_q}) grow(*v, padded);
    grow(lse, tile);
    grow(best_k, tile);
    grow(group, tile);
  }

 private:
  template <typename V>
  static void grow(std::vector<V>& v, int64_t size) {
    if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  }
};

// Workspaces kept between calls: allocating them per call cost a quarter of a small call's time (page faults on
// fresh buffers of a few hundred KB; measured at N=64, d=512). Concurrent calls lease distinct workspaces, and a
// lease returns them when it ends, exceptions included.
template <typename T>
class WorkspaceLease {
 public:
  WorkspaceLease(int count, int64_t tile, int64_t max_ld, int64_t max_simd_ld, bool nearest) {
    {
      std::lock_guard<std::mutex> lock(mutex());
      while (static_cast<int>(spaces_.size()) < count && !pool().empty()) {
        spaces_.push_back(std::move(pool().back()));
        pool().pop_back();
      }
    }
    while (static_cast<int>(spaces_.size()) < count) spaces_.push_back(std::make_unique<Workspace<T>>());
    for (auto& ws : spaces_) ws->reserve(tile, max_ld, max_simd_ld, nearest);
  }
  ~WorkspaceLease() {
    std::lock_guard<std::mutex> lock(mutex());
    for (auto& ws : spaces_) pool().push_back(std::move(ws));
  }
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  Workspace<T>& operator[](int i) { return *spaces_[i]; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::unique_ptr<Workspace<T>>>& pool() {
    static std::vector<std::unique_ptr<Workspace<T>>> p;
    return p;
  }
  std::vector<std::unique_ptr<Workspace<T>>> spaces_;
};

// y (rows x F.ld) = (x - mu_k) U_k, centred while loading, and q (rows) = squared row norms of y.
template <typename T>
void first_product(const GmmLayer<T>& L, const Factors<T>& F, int64_t k, const T* x, int64_t rows, Workspace<T>& ws) {
  const int64_t d = L.d, ld = F.ld;
  const T* mu = L.means + k * d;
  T* y = ws.y.data();
  T* z = F.simd ? ws.z.data() : y;  // the BLAS path multiplies in place
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) z[i * ld + j] = x[i * d + j] - mu[j];
  }
  if (F.simd) {
    const int64_t padded = round_up(rows, kMicroRows);
    std::fill(z + rows * ld, z + padded * ld, T(0));
    rows_times_factor(z, padded, ld, F.component(k), F.layout.upper, d, true, y);
  } else {
    trmm_right_upper(false, rows, d, L.prec_chol + k * d * d, y);
  }
  for (int64_t i = 0; i < rows; ++i) {
    T q = 0;
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < d; ++j) q += y[i * ld + j] * y[i * ld + j];
    ws.q[i] = q;
  }
}

// acc = acc * scale_old + weight_new * (y U_k^T) per row (y is overwritten on the BLAS path).
template <typename T>
void accumulate_grad(const GmmLayer<T>& L, const Factors<T>& F, int64_t k, int64_t rows, Workspace<T>& ws) {
  const int64_t d = L.d, ld = F.ld;
  T* y = ws.y.data();
  T* acc = ws.acc.data();
  if (!F.simd) {
    for (int64_t i = 0; i < rows; ++i) {
      const T w = ws.weight_new[i];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) y[i * d + j] *= w;
    }
    trmm_right_upper(true, rows, d, L.prec_chol + k * d * d, y);
    for (int64_t i = 0; i < rows; ++i) {
      const T s = ws.scale_old[i];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) acc[i * d + j] = acc[i * d + j] * s + y[i * d + j];
    }
    return;
  }
  rows_times_factor(y, round_up(rows, kMicroRows), ld, F.component(k), F.layout.lower, d, false, acc,
                      ws.scale_old.data(), ws.weight_new.data());
}

template <typename T>
void loglik_tile(const GmmLayer<T>& L, const Factors<T>& F, int64_t row0, int64_t rows, Workspace<T>& ws) {
  const int64_t d = L.d, ld = F.ld;
  const T* x = L.x + row0 * d;
  T* acc = ws.acc.data();
  const bool need_grad = L.grad != nullptr;
  std::fill(ws.lse.begin(), ws.lse.begin() + rows, OnlineLse<T>{});
  std::fill(ws.best_logp.begin(), ws.best_logp.begin() + rows, -std::numeric_limits<T>::infinity());
  std::fill(ws.best_k.begin(), ws.best_k.begin() + rows, 0);
  if (need_grad) std::fill(acc, acc + round_up(rows, kMicroRows) * ld, T(0));
  // Rows past `rows` (SIMD padding) keep neutral weights: their products are zero, but stale values from an
  // earlier call must stay finite.
  std::fill(ws.scale_old.begin() + rows, ws.scale_old.begin() + round_up(rows, kMicroRows), T(1));
  std::fill(ws.weight_new.begin() + rows, ws.weight_new.begin() + round_up(rows, kMicroRows), T(0));

  for (int64_t k = 0; k < L.k; ++k) {
    first_product(L, F, k, x, rows, ws);
    T max_weight = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const T logp = L.log_norm[k] - T(0.5) * ws.q[i];
      if (logp > ws.best_logp[i]) {
        ws.best_logp[i] = logp;
        ws.best_k[i] = k;
      }
      ws.lse[i].add(logp, ws.scale_old[i], ws.weight_new[i]);
      max_weight = std::max(max_weight, ws.weight_new[i]);
    }
    // All scale_old are 1 when every weight is tiny (a new maximum has weight 1), so the skip is exact bookkeeping.
    if (!need_grad || max_weight < negligible_weight<T>()) continue;
    accumulate_grad(L, F, k, rows, ws);
  }

  for (int64_t i = 0; i < rows; ++i) {
    L.value[row0 + i] = ws.lse[i].value();
    if (L.component) L.component[row0 + i] = ws.best_k[i];
    if (!need_grad) continue;
    const T inv = T(-1) / ws.lse[i].sum;
    T* g = L.grad + (row0 + i) * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) g[j] = acc[i * ld + j] * inv;
  }
}

template <typename T>
void nearest_tile(const GmmLayer<T>& L, const Factors<T>& F, int64_t row0, int64_t rows, Workspace<T>& ws) {
  const int64_t d = L.d, ld = F.ld;
  const T* x = L.x + row0 * d;
  T* y = ws.y.data();
  std::fill(ws.best_logp.begin(), ws.best_logp.begin() + rows, -std::numeric_limits<T>::infinity());
  std::fill(ws.best_k.begin(), ws.best_k.begin() + rows, 0);
  std::fill(ws.best_q.begin(), ws.best_q.begin() + rows, T(0));

  for (int64_t k = 0; k < L.k; ++k) {
    first_product(L, F, k, x, rows, ws);
    for (int64_t i = 0; i < rows; ++i) {
      const T q = ws.q[i];
      const T logp = L.log_norm[k] - T(0.5) * q;
      if (k == 0 || logp > ws.best_logp[i]) {
        ws.best_logp[i] = logp;
        ws.best_k[i] = k;
        ws.best_q[i] = q;
        if (L.grad) std::copy(y + i * ld, y + i * ld + d, ws.best_y.data() + i * d);
      }
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    L.value[row0 + i] = ws.best_q[i];
    if (L.component) L.component[row0 + i] = ws.best_k[i];
  }
  if (!L.grad) return;
  // grad = 2 y_{k*} U_{k*}^T: gather the rows that chose each component and apply its factor once per group.
  for (int64_t k = 0; k < L.k; ++k) {
    int64_t m = 0;
    for (int64_t i = 0; i < rows; ++i) {
      if (ws.best_k[i] != k) continue;
      std::copy(ws.best_y.data() + i * d, ws.best_y.data() + (i + 1) * d, y + m * d);
      ws.group[m++] = i;
    }
    if (m == 0) continue;
    trmm_right_upper(true, m, d, L.prec_chol + k * d * d, y);
    for (int64_t r = 0; r < m; ++r) {
      T* g = L.grad + (row0 + ws.group[r]) * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) g[j] = T(2) * y[r * d + j];
    }
  }
}

int64_t choose_tile(const std::vector<int64_t>& rows_per_layer, int64_t requested, int threads) {
  if (requested > 0) return requested;
  int64_t total = 0;
  for (int64_t n : rows_per_layer) total += n;
  int64_t tile = total / (kGmmItemsPerThread * threads);
  tile = std::clamp(tile, kGmmMinRowTile, kGmmMaxRowTile);
  return (tile + kGmmMinRowTile - 1) / kGmmMinRowTile * kGmmMinRowTile;
}

}  // namespace

template <typename T>
void gmm_validate(const GmmParams<T>& params) {
  require(params.row_tile >= 0, "row_tile must be >= 0 (0 = automatic), got " + std::to_string(params.row_tile));
  require(params.simd_max_dim >= 0, "simd_max_dim must be >= 0, got " + std::to_string(params.simd_max_dim));
  for (size_t l = 0; l < params.layers.size(); ++l) {
    const GmmLayer<T>& L = params.layers[l];
    const std::string where = "gmm layer " + std::to_string(l) + ": ";
    require(L.d >= 1, where + "dimension d must be >= 1, got " + std::to_string(L.d));
    require(L.k >= 1, where + "number of components K must be >= 1, got " + std::to_string(L.k));
    require(L.n >= 0, where + "number of rows N must be >= 0, got " + std::to_string(L.n));
    require(L.d <= std::numeric_limits<int32_t>::max() && L.n <= std::numeric_limits<int32_t>::max(),
            where + "N and d must fit in 32-bit BLAS indices");
    require(L.means && L.prec_chol && L.log_norm, where + "means, prec_chol and log_norm must be set");
    require(L.n == 0 || (L.x && L.value), where + "x and value must be set when N > 0");
  }
}

template <typename T>
void gmm_forward(const GmmParams<T>& params) {
  gmm_validate(params);
  const int threads = params.num_threads > 0 ? params.num_threads : omp_get_max_threads();
  std::vector<int64_t> rows_per_layer;
  std::vector<Factors<T>> factors;  // allocated here, outside the parallel region, so bad_alloc propagates
  int64_t max_ld = 1, max_simd_ld = 0;
  for (size_t l = 0; l < params.layers.size(); ++l) {
    const GmmLayer<T>& L = params.layers[l];
    rows_per_layer.push_back(L.n);
    factors.emplace_back(L, L.n > 0 && L.d <= params.simd_max_dim);
    max_ld = std::max(max_ld, factors.back().ld);
    if (factors.back().simd) max_simd_ld = std::max(max_simd_ld, factors.back().ld);
  }
  const int64_t tile = choose_tile(rows_per_layer, params.row_tile, threads);

  std::vector<WorkItem> items;
  for (size_t l = 0; l < params.layers.size(); ++l) {
    const GmmLayer<T>& L = params.layers[l];
    for (int64_t r = 0; r < L.n; r += tile) {
      const int64_t rows = std::min(tile, L.n - r);
      items.push_back({static_cast<int64_t>(l), r, rows, double(rows) * double(L.k) * double(L.d) * double(L.d + 8)});
    }
  }
  if (items.empty()) return;
  // Largest first, so dynamic scheduling balances layers of very different d.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });

  // One thread for small calls: a parallel region costs more than it saves there (and far more on a loaded
  // machine, where the barrier waits for a descheduled thread).
  double work = 0;
  for (const WorkItem& it : items) work += it.cost;
  const bool nearest = params.mode == GmmMode::kNearest;
  const int used = work < kGmmMinParallelWork
                       ? 1
                       : static_cast<int>(std::min<int64_t>(threads, static_cast<int64_t>(items.size())));
  WorkspaceLease<T> spaces(used, tile, max_ld, max_simd_ld, nearest);
  auto run_item = [&](const WorkItem& it, Workspace<T>& ws) {
    const GmmLayer<T>& L = params.layers[it.layer];
    if (nearest) {
      nearest_tile(L, factors[it.layer], it.row0, it.rows, ws);
    } else {
      loglik_tile(L, factors[it.layer], it.row0, it.rows, ws);
    }
  };
  if (used == 1) {
    DenormalGuard guard;
    for (const WorkItem& it : items) run_item(it, spaces[0]);
    return;
  }
#pragma omp parallel num_threads(used)
  {
    DenormalGuard guard;
    Workspace<T>& ws = spaces[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) run_item(items[i], ws);
  }
}

template <typename T>
int64_t gmm_packed_size(int64_t d, int64_t k) {
  require(d >= 1 && k >= 1, "gmm_packed_size: d and K must be >= 1");
  return k * PackedLayout<T>(d).component;
}

template <typename T>
void gmm_pack(const T* prec_chol, int64_t d, int64_t k, T* packed) {
  require(d >= 1 && k >= 1, "gmm_pack: d and K must be >= 1");
  PackedLayout<T>(d).pack_all(prec_chol, d, k, packed);
}

template void gmm_validate<float>(const GmmParams<float>&);
template void gmm_validate<double>(const GmmParams<double>&);
template void gmm_forward<float>(const GmmParams<float>&);
template void gmm_forward<double>(const GmmParams<double>&);
template int64_t gmm_packed_size<float>(int64_t, int64_t);
template int64_t gmm_packed_size<double>(int64_t, int64_t);
template void gmm_pack<float>(const float*, int64_t, int64_t, float*);
template void gmm_pack<double>(const double*, int64_t, int64_t, double*);

}  // namespace hfc
