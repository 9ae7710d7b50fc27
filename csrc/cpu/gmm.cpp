// CPU implementation of hfc/gmm.h: OpenMP over (layer, row-tile) work items; triangular products by OpenBLAS
// trmm, or for d <= simd_max_dim by register-blocked SIMD code on zero-padded factors.
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

// ---- small-d path: register-blocked SIMD triangular products (OpenBLAS trmm is inefficient for small d) ------

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
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// acc[b][r] += a[r, i] * M[i, j0 + b*L : j0 + (b+1)*L] for i in [lo, hi), for NB column vectors and
// kMicroRows rows: NB loads of M feed NB * kMicroRows FMAs.
template <typename T, int NB>
inline void fma_rows(typename Simd<T>::vec (&acc)[2][kMicroRows], const T* a, int64_t lda, const T* m, int64_t ld,
                     int64_t j0, int64_t lo, int64_t hi, int first) {
  using V = typename Simd<T>::vec;
  constexpr int64_t kL = Simd<T>::kLanes;
  for (int64_t i = lo; i < hi; ++i) {
    V mv[NB];
    for (int b = 0; b < NB; ++b) mv[b] = *reinterpret_cast<const V*>(m + i * ld + j0 + (first + b) * kL);
    for (int64_t r = 0; r < kMicroRows; ++r) {
      const T ar = a[r * lda + i];
      for (int b = 0; b < NB; ++b) acc[first + b][r] += ar * mv[b];
    }
  }
}

// y = z U for kMicroRows rows (U upper triangular, d x ld zero-padded), and q[r] = ||y_r||^2. Only the nonzero
// rows of U are visited for each pair of column vectors, which halves the multiply-adds.
template <typename T>
inline void micro_upper(const T* z, const T* u, int64_t d, int64_t ld, T* y, T* q) {
  using V = typename Simd<T>::vec;
  constexpr int64_t kL = Simd<T>::kLanes;
  V qv[kMicroRows] = {};
  for (int64_t j0 = 0; j0 < d; j0 += 2 * kL) {
    const bool two = j0 + kL < d;
    V acc[2][kMicroRows] = {};
    const int64_t hi_a = std::min(d, j0 + kL);
    if (two) {
      fma_rows<T, 2>(acc, z, ld, u, ld, j0, 0, hi_a, 0);
      fma_rows<T, 1>(acc, z, ld, u, ld, j0, hi_a, std::min(d, j0 + 2 * kL), 1);
    } else {
      fma_rows<T, 1>(acc, z, ld, u, ld, j0, 0, hi_a, 0);
    }
    for (int b = 0; b < (two ? 2 : 1); ++b) {
      for (int64_t r = 0; r < kMicroRows; ++r) {
        *reinterpret_cast<V*>(y + r * ld + j0 + b * kL) = acc[b][r];
        qv[r] += acc[b][r] * acc[b][r];
      }
    }
  }
  for (int64_t r = 0; r < kMicroRows; ++r) {
    T sum = 0;
    for (int64_t l = 0; l < kL; ++l) sum += qv[r][l];
    q[r] = sum;
  }
}

// acc = acc * scale[r] + weight[r] * (y V) for kMicroRows rows (V = U^T lower triangular, d x ld zero-padded).
template <typename T>
inline void micro_lower(const T* y, const T* v, int64_t d, int64_t ld, T* acc_out, const T* scale, const T* weight) {
  using V = typename Simd<T>::vec;
  constexpr int64_t kL = Simd<T>::kLanes;
  for (int64_t j0 = 0; j0 < d; j0 += 2 * kL) {
    const bool two = j0 + kL < d;
    V acc[2][kMicroRows] = {};
    if (two) {
      fma_rows<T, 1>(acc, y, ld, v, ld, j0, j0, j0 + kL, 0);
      fma_rows<T, 2>(acc, y, ld, v, ld, j0, j0 + kL, d, 0);
    } else {
      fma_rows<T, 1>(acc, y, ld, v, ld, j0, j0, d, 0);
    }
    for (int b = 0; b < (two ? 2 : 1); ++b) {
      for (int64_t r = 0; r < kMicroRows; ++r) {
        V* out = reinterpret_cast<V*>(acc_out + r * ld + j0 + b * kL);
        *out = *out * scale[r] + acc[b][r] * weight[r];
      }
    }
  }
}

// How one layer's factors are applied: OpenBLAS trmm on U (ld = d), or the SIMD path on zero-padded copies of
// U and U^T with row stride ld (a multiple of the vector width).
template <typename T>
struct Factors {
  bool simd = false;
  int64_t ld = 0;
  std::vector<T> upper, lower;  // (K, d, ld) each, SIMD path only

  Factors(const GmmLayer<T>& L, bool use_simd) : simd(use_simd), ld(use_simd ? round_up(L.d, Simd<T>::kLanes) : L.d) {
    if (!simd) return;
    upper.assign(L.k * L.d * ld, T(0));
    lower.assign(L.k * L.d * ld, T(0));
  }
  void fill(const GmmLayer<T>& L, int64_t k) {  // component k's padded U and U^T (upper triangle of U read only)
    const T* u = L.prec_chol + k * L.d * L.d;
    T* up = upper.data() + k * L.d * ld;
    T* lo = lower.data() + k * L.d * ld;
    for (int64_t i = 0; i < L.d; ++i) {
      for (int64_t j = i; j < L.d; ++j) up[i * ld + j] = lo[j * ld + i] = u[i * L.d + j];
    }
  }
};

// Per-thread scratch, sized for the largest (tile rounded up to kMicroRows) x row stride of the call.
template <typename T>
struct Workspace {
  std::vector<T> y, acc, best_y, z;
  std::vector<T> q, scale_old, weight_new, best_logp, best_q;
  std::vector<OnlineLse<T>> lse;
  std::vector<int64_t> best_k, group;

  Workspace(int64_t tile, int64_t max_ld, bool nearest)
      : y(round_up(tile, kMicroRows) * max_ld),
        acc(round_up(tile, kMicroRows) * max_ld),
        best_y(nearest ? tile * max_ld : 0),
        z(kMicroRows * max_ld),
        q(round_up(tile, kMicroRows)),
        scale_old(round_up(tile, kMicroRows), T(1)),
        weight_new(round_up(tile, kMicroRows), T(0)),
        best_logp(tile),
        best_q(tile),
        lse(tile),
        best_k(tile),
        group(tile) {}
};

// y (rows x F.ld) = (x - mu_k) U_k, centred while loading, and q (rows) = squared row norms of y.
template <typename T>
void first_product(const GmmLayer<T>& L, const Factors<T>& F, int64_t k, const T* x, int64_t rows, Workspace<T>& ws) {
  const int64_t d = L.d, ld = F.ld;
  const T* mu = L.means + k * d;
  T* y = ws.y.data();
  if (!F.simd) {
    for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) y[i * d + j] = x[i * d + j] - mu[j];
    }
    trmm_right_upper(false, rows, d, L.prec_chol + k * d * d, y);
    for (int64_t i = 0; i < rows; ++i) {
      T q = 0;
#pragma omp simd reduction(+ : q)
      for (int64_t j = 0; j < d; ++j) q += y[i * d + j] * y[i * d + j];
      ws.q[i] = q;
    }
    return;
  }
  T* z = ws.z.data();
  const T* u = F.upper.data() + k * d * ld;
  for (int64_t r0 = 0; r0 < rows; r0 += kMicroRows) {
    for (int64_t r = 0; r < kMicroRows; ++r) {
      if (r0 + r < rows) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) z[r * ld + j] = x[(r0 + r) * d + j] - mu[j];
      } else {
        std::fill(z + r * ld, z + r * ld + d, T(0));
      }
    }
    micro_upper(z, u, d, ld, y + r0 * ld, ws.q.data() + r0);
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
  const T* v = F.lower.data() + k * d * ld;
  for (int64_t r0 = 0; r0 < rows; r0 += kMicroRows) {
    micro_lower(y + r0 * ld, v, d, ld, acc + r0 * ld, ws.scale_old.data() + r0, ws.weight_new.data() + r0);
  }
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
  std::vector<std::pair<int64_t, int64_t>> fills;  // (layer, component) padded factors to build
  int64_t max_ld = 1;
  for (size_t l = 0; l < params.layers.size(); ++l) {
    const GmmLayer<T>& L = params.layers[l];
    rows_per_layer.push_back(L.n);
    factors.emplace_back(L, L.n > 0 && L.d <= params.simd_max_dim);
    max_ld = std::max(max_ld, factors.back().ld);
    for (int64_t k = 0; factors.back().simd && k < L.k; ++k) fills.emplace_back(static_cast<int64_t>(l), k);
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

  for (const auto& [layer, k] : fills) factors[layer].fill(params.layers[layer], k);  // O(K d^2): cheap

  // One thread for small calls: a parallel region costs more than it saves there (and far more on a loaded
  // machine, where the barrier waits for a descheduled thread).
  double work = 0;
  for (const WorkItem& it : items) work += it.cost;
  const bool nearest = params.mode == GmmMode::kNearest;
  const int used = work < kGmmMinParallelWork
                       ? 1
                       : static_cast<int>(std::min<int64_t>(threads, static_cast<int64_t>(items.size())));
  std::vector<Workspace<T>> spaces;
  spaces.reserve(used);
  for (int t = 0; t < used; ++t) spaces.emplace_back(tile, max_ld, nearest);
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

template void gmm_validate<float>(const GmmParams<float>&);
template void gmm_validate<double>(const GmmParams<double>&);
template void gmm_forward<float>(const GmmParams<float>&);
template void gmm_forward<double>(const GmmParams<double>&);

}  // namespace hfc
