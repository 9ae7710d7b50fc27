// hfc::knn / hfc::lid / hfc::kde_log_density / hfc::mahalanobis against brute-force double loops (float and double,
// several tiles, exclude_self, ties, offset data) and their argument checks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"
#include "hfc/common.h"
#include "hfc/kde.h"
#include "hfc/knn.h"
#include "hfc/mahalanobis.h"
#include "hfc/math.h"

namespace {

std::vector<double> normal_matrix(int64_t rows, int64_t cols, unsigned seed, double offset = 0.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<double> out(rows * cols);
  for (double& v : out) v = offset + normal(gen);
  return out;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

double sq_distance(const double* a, const double* b, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += (a[c] - b[c]) * (a[c] - b[c]);
  return s;
}

// Sorted (distance, index) pairs of one query row, ties by index; skips `self` (or -1).
std::vector<std::pair<double, int64_t>> brute_row(const std::vector<double>& x, int64_t i,
                                                  const std::vector<double>& ref, int64_t m, int64_t d, int64_t self) {
  std::vector<std::pair<double, int64_t>> all;
  for (int64_t j = 0; j < m; ++j)
    if (j != self) all.emplace_back(std::sqrt(sq_distance(&x[i * d], &ref[j * d], d)), j);
  std::sort(all.begin(), all.end());
  return all;
}

// Runs hfc::knn in precision T (small tiles, so several query and reference tiles) and checks every row.
template <typename T>
void check_knn(int64_t n, int64_t m, int64_t d, int64_t k, bool exclude_self, double offset, double rtol) {
  const std::vector<double> ref = normal_matrix(m, d, 11, offset);
  const std::vector<double> x = exclude_self ? ref : normal_matrix(n, d, 12, offset);
  // Use the T-rounded inputs for the reference too.
  const std::vector<T> xt = cast<T>(x), rt = cast<T>(ref);
  const std::vector<double> xr(xt.begin(), xt.end()), rr(rt.begin(), rt.end());
  hfc::KnnParams p;
  p.n = n, p.m = m, p.d = d, p.k = k, p.exclude_self = exclude_self, p.tile_queries = 7, p.tile_refs = 13;
  std::vector<T> dist(n * k);
  std::vector<int64_t> index(n * k);
  hfc::knn(p, xt.data(), rt.data(), dist.data(), index.data());
  for (int64_t i = 0; i < n; ++i) {
    const auto want = brute_row(xr, i, rr, m, d, exclude_self ? i : -1);
    for (int64_t c = 0; c < k; ++c) {
      CHECK(index[i * k + c] == want[c].second);
      CHECK_NEAR(dist[i * k + c], want[c].first, rtol * want[c].first + 1e-300);
    }
  }
}

}  // namespace

TEST(knn_matches_brute_force_float) { check_knn<float>(23, 41, 5, 4, false, 0.0, 1e-6); }
TEST(knn_matches_brute_force_double) { check_knn<double>(23, 41, 5, 40, false, 0.0, 1e-13); }
TEST(knn_exclude_self) { check_knn<double>(30, 30, 3, 5, true, 0.0, 1e-13); }
TEST(knn_offset_float_is_exact_after_recomputation) { check_knn<float>(17, 50, 8, 3, false, 1000.0, 1e-6); }
TEST(knn_single_row_single_column) { check_knn<float>(1, 2, 1, 1, false, 0.0, 1e-6); }

TEST(knn_ties_go_to_the_smaller_index) {
  const int64_t m = 12, d = 2;
  std::vector<double> ref(m * d, 0.0);
  for (int64_t j = 0; j < m; ++j) ref[j * d] = double(j % 3);  // each distance appears four times
  const std::vector<double> x = {0.0, 0.0};
  hfc::KnnParams p;
  p.n = 1, p.m = m, p.d = d, p.k = 6, p.tile_refs = 5;
  std::vector<double> dist(6);
  std::vector<int64_t> index(6);
  hfc::knn(p, x.data(), ref.data(), dist.data(), index.data());
  const int64_t want[] = {0, 3, 6, 9, 1, 4};
  for (int c = 0; c < 6; ++c) CHECK(index[c] == want[c]);
  CHECK_NEAR(dist[5], 1.0, 0.0);
}

TEST(lid_matches_formula) {
  const int64_t n = 9, m = 40, d = 4, k = 10;
  const std::vector<double> x = normal_matrix(n, d, 3), ref = normal_matrix(m, d, 4);
  hfc::KnnParams p;
  p.n = n, p.m = m, p.d = d, p.k = k;
  std::vector<double> out(n);
  hfc::lid(p, x.data(), ref.data(), out.data());
  for (int64_t i = 0; i < n; ++i) {
    const auto row = brute_row(x, i, ref, m, d, -1);
    double acc = 0;
    for (int64_t c = 0; c < k; ++c) acc += std::log(row[c].first / row[k - 1].first);
    CHECK_NEAR(out[i], -double(k) / acc, 1e-10 * std::fabs(out[i]));
  }
}

TEST(knn_rejects_bad_arguments) {
  auto throws = [](hfc::KnnParams p) {
    try {
      hfc::knn_validate(p);
    } catch (const hfc::ArgumentError&) {
      return true;
    }
    return false;
  };
  hfc::KnnParams ok;
  ok.n = 4, ok.m = 4, ok.d = 2, ok.k = 3;
  CHECK(!throws(ok));
  hfc::KnnParams p = ok;
  p.k = 4;  // k >= M
  CHECK(throws(p));
  p = ok, p.exclude_self = true;  // k >= M - 1
  CHECK(throws(p));
  p = ok, p.exclude_self = true, p.n = 3;  // N != M
  CHECK(throws(p));
  p = ok, p.k = 0;
  CHECK(throws(p));
  p = ok, p.d = 0;
  CHECK(throws(p));
}

template <typename T>
void check_kde(double offset, double bandwidth, double tol) {
  const int64_t n = 19, m = 33, d = 6;
  const std::vector<double> ref = normal_matrix(m, d, 5, offset), x = normal_matrix(n, d, 6, offset);
  const std::vector<T> xt = cast<T>(x), rt = cast<T>(ref);
  hfc::KdeParams p;
  p.n = n, p.m = m, p.d = d, p.bandwidth = bandwidth, p.tile_queries = 4, p.tile_refs = 10;
  std::vector<T> out(n);
  hfc::kde_log_density(p, xt.data(), rt.data(), out.data());
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> terms;
    for (int64_t j = 0; j < m; ++j)
      terms.push_back(-sq_distance(&x[i * d], &ref[j * d], d) / (2 * bandwidth * bandwidth));
    const double top = *std::max_element(terms.begin(), terms.end());
    double sum = 0;
    for (double t : terms) sum += std::exp(t - top);
    const double want = top + std::log(sum) - hfc::kde_log_norm<double>(int(d), int(m), bandwidth);
    CHECK_NEAR(out[i], want, tol * std::max(1.0, std::fabs(want)));
  }
}

TEST(kde_matches_brute_force_double) { check_kde<double>(0.0, 0.8, 1e-12); }
TEST(kde_matches_brute_force_float_offset) { check_kde<float>(500.0, 1.5, 1e-4); }
TEST(kde_far_queries_stay_finite) { check_kde<double>(0.0, 0.02, 1e-12); }

TEST(kde_rejects_bad_bandwidth) {
  for (double h : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    hfc::KdeParams p;
    p.n = 1, p.m = 1, p.d = 1, p.bandwidth = h;
    bool threw = false;
    try {
      hfc::kde_validate(p);
    } catch (const hfc::ArgumentError&) {
      threw = true;
    }
    CHECK(threw);
  }
}

TEST(exp_nonpositive_is_accurate) {
  for (double t = -80.0; t <= 0.0; t += 0.37) {
    CHECK_NEAR(hfc::exp_nonpositive(float(t)) / std::exp(double(float(t))), 1.0, 3e-7);
    CHECK_NEAR(hfc::exp_nonpositive(t) / std::exp(t), 1.0, 1e-15);
  }
}

template <typename T>
void check_mahalanobis(double tol) {
  // Two layers of different sizes in one call; precision = A A^T + I (positive definite, not diagonal).
  const int64_t sizes[2][3] = {{300, 3, 7}, {5, 1, 2}};  // (n, c, d); 300 rows span two row tiles
  std::vector<std::vector<double>> xs, ms, ps;
  hfc::MahalanobisParams<T> params;
  std::vector<std::vector<T>> xt, mt, pt, out;
  for (int l = 0; l < 2; ++l) {
    const int64_t n = sizes[l][0], c = sizes[l][1], d = sizes[l][2];
    xs.push_back(normal_matrix(n, d, 20 + l, 10.0));
    ms.push_back(normal_matrix(c, d, 30 + l, 10.0));
    const std::vector<double> a = normal_matrix(d, d, 40 + l);
    std::vector<double> p(d * d);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        for (int64_t q = 0; q < d; ++q) p[i * d + j] += a[i * d + q] * a[j * d + q];
        p[i * d + j] += i == j ? 1.0 : 0.0;
      }
    ps.push_back(p);
    xt.push_back(cast<T>(xs[l]));
    mt.push_back(cast<T>(ms[l]));
    pt.push_back(cast<T>(ps[l]));
    out.emplace_back(n * c);
  }
  for (int l = 0; l < 2; ++l)
    params.layers.push_back({xt[l].data(), mt[l].data(), pt[l].data(), sizes[l][0], sizes[l][1], sizes[l][2],
                             out[l].data()});
  hfc::mahalanobis(params);
  for (int l = 0; l < 2; ++l) {
    const int64_t n = sizes[l][0], c = sizes[l][1], d = sizes[l][2];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < c; ++k) {
        double q = 0;
        for (int64_t a = 0; a < d; ++a)
          for (int64_t b = 0; b < d; ++b)
            q += (double(xt[l][i * d + a]) - mt[l][k * d + a]) * pt[l][a * d + b] *
                 (double(xt[l][i * d + b]) - mt[l][k * d + b]);
        CHECK_NEAR(out[l][i * c + k], q, tol * std::max(1.0, q));
      }
  }
}

TEST(mahalanobis_matches_brute_force_double) { check_mahalanobis<double>(1e-11); }
TEST(mahalanobis_matches_brute_force_float) { check_mahalanobis<float>(1e-4); }

TEST(mahalanobis_rejects_non_positive_definite_precision) {
  const std::vector<double> x = {1.0, 2.0}, means = {0.0, 0.0}, precision = {1.0, 2.0, 2.0, 1.0};  // eigen -1, 3
  std::vector<double> out(1);
  hfc::MahalanobisParams<double> params;
  params.layers.push_back({x.data(), means.data(), precision.data(), 1, 1, 2, out.data()});
  bool threw = false;
  try {
    hfc::mahalanobis(params);
  } catch (const hfc::ArgumentError& e) {
    threw = std::string(e.what()).find("precision is not positive definite") != std::string::npos;
  }
  CHECK(threw);
}
