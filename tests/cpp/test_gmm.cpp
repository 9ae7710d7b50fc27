// hfc::gmm_forward against a brute-force double loop (both modes, several layers in one call, float and double).
#include <cblas.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "harness.h"
#include "hfc/common.h"
#include "hfc/gmm.h"
#include "hfc/math.h"

namespace {

struct Mixture {
  int64_t n, d, k;
  std::vector<double> x, means, chol, log_norm;
};

Mixture make_mixture(int64_t n, int64_t d, int64_t k, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  Mixture m{n, d, k, {}, {}, {}, {}};
  for (int64_t i = 0; i < n * d; ++i) m.x.push_back(2.0 * normal(gen) + 40.0);
  for (int64_t i = 0; i < k * d; ++i) m.means.push_back(2.0 * normal(gen) + 40.0);
  m.chol.assign(k * d * d, 0.0);
  for (int64_t c = 0; c < k; ++c) {
    double log_det = 0;
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = i; j < d; ++j) m.chol[(c * d + i) * d + j] = i == j ? 0.5 + std::fabs(normal(gen)) : 0.3 * normal(gen);
      log_det += std::log(m.chol[(c * d + i) * d + i]);
    }
    m.log_norm.push_back(std::log(1.0 / k) + log_det - 0.5 * d * hfc::kLog2Pi);
  }
  return m;
}

// Brute force: per row, per component, y_j = sum_{i<=j} (x_i - mu_i) U_ij; returns (logp or q, grad, k*).
void brute_force(const Mixture& m, int64_t row, bool nearest, double& value, std::vector<double>& grad, int64_t& best) {
  const int64_t d = m.d;
  std::vector<std::vector<double>> ys(m.k, std::vector<double>(d, 0.0));
  std::vector<double> logp(m.k), q(m.k, 0.0);
  best = 0;
  for (int64_t c = 0; c < m.k; ++c) {
    for (int64_t j = 0; j < d; ++j) {
      for (int64_t i = 0; i <= j; ++i) ys[c][j] += (m.x[row * d + i] - m.means[c * d + i]) * m.chol[(c * d + i) * d + j];
      q[c] += ys[c][j] * ys[c][j];
    }
    logp[c] = m.log_norm[c] - 0.5 * q[c];
    if (logp[c] > logp[best]) best = c;
  }
  double total = 0;
  for (int64_t c = 0; c < m.k; ++c) total += std::exp(logp[c] - logp[best]);
  value = nearest ? q[best] : logp[best] + std::log(total);
  grad.assign(d, 0.0);
  for (int64_t c = 0; c < m.k; ++c) {
    const double coef = nearest ? (c == best ? 2.0 : 0.0) : -std::exp(logp[c] - logp[best]) / total;
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = i; j < d; ++j) grad[i] += coef * ys[c][j] * m.chol[(c * d + i) * d + j];
    }
  }
}

template <typename T>
void check_against_brute_force(hfc::GmmMode mode, double tol, int64_t simd_max_dim, bool pack = false) {
  scipy_openblas_set_num_threads(1);
  const std::vector<Mixture> mixtures = {make_mixture(37, 5, 3, 1), make_mixture(1, 1, 1, 2), make_mixture(20, 9, 4, 3)};
  std::vector<std::vector<T>> xs, mus, us, lns, values, grads, packs;
  std::vector<std::vector<int64_t>> comps;
  hfc::GmmParams<T> params;
  params.mode = mode;
  params.row_tile = 16;
  params.simd_max_dim = simd_max_dim;  // 0: OpenBLAS trmm; else the SIMD small-d path
  for (const Mixture& m : mixtures) {
    xs.emplace_back(m.x.begin(), m.x.end());
    mus.emplace_back(m.means.begin(), m.means.end());
    us.emplace_back(m.chol.begin(), m.chol.end());
    lns.emplace_back(m.log_norm.begin(), m.log_norm.end());
    values.emplace_back(m.n);
    grads.emplace_back(m.n * m.d);
    comps.emplace_back(m.n);
    packs.emplace_back(pack ? hfc::gmm_packed_size<T>(m.d, m.k) : 0);
    if (pack) hfc::gmm_pack(us.back().data(), m.d, m.k, packs.back().data());
  }
  for (size_t l = 0; l < mixtures.size(); ++l) {
    const Mixture& m = mixtures[l];
    params.layers.push_back({xs[l].data(), mus[l].data(), us[l].data(), lns[l].data(), m.n, m.d, m.k,
                             values[l].data(), grads[l].data(), comps[l].data(), pack ? packs[l].data() : nullptr});
  }
  hfc::gmm_forward(params);
  const bool nearest = mode == hfc::GmmMode::kNearest;
  for (size_t l = 0; l < mixtures.size(); ++l) {
    const Mixture& m = mixtures[l];
    for (int64_t r = 0; r < m.n; ++r) {
      double value;
      int64_t best;
      std::vector<double> grad;
      brute_force(m, r, nearest, value, grad, best);
      CHECK_NEAR(values[l][r], value, tol * (1.0 + std::fabs(value)));
      CHECK(comps[l][r] == best);
      for (int64_t i = 0; i < m.d; ++i) CHECK_NEAR(grads[l][r * m.d + i], grad[i], tol * (1.0 + std::fabs(grad[i])));
    }
  }
}

}  // namespace

TEST(gmm_loglik_double_matches_brute_force) {
  for (int64_t simd : {0, 4096}) check_against_brute_force<double>(hfc::GmmMode::kLogLik, 1e-9, simd);
}
TEST(gmm_nearest_double_matches_brute_force) {
  for (int64_t simd : {0, 4096}) check_against_brute_force<double>(hfc::GmmMode::kNearest, 1e-9, simd);
}
TEST(gmm_loglik_float_matches_brute_force) {
  for (int64_t simd : {0, 4096}) check_against_brute_force<float>(hfc::GmmMode::kLogLik, 2e-3, simd);
}
TEST(gmm_prepacked_factors_match_brute_force) {  // GmmLayer::packed from gmm_pack instead of packing per call
  check_against_brute_force<double>(hfc::GmmMode::kLogLik, 1e-9, 4096, true);
  check_against_brute_force<double>(hfc::GmmMode::kNearest, 1e-9, 4096, true);
  check_against_brute_force<float>(hfc::GmmMode::kLogLik, 2e-3, 4096, true);
}

TEST(gmm_rejects_bad_arguments) {
  std::vector<double> x(4), mu(2), u(4), ln(1), out(2);
  hfc::GmmParams<double> params;
  params.layers.push_back({x.data(), mu.data(), u.data(), ln.data(), 2, 2, 0, out.data(), nullptr, nullptr});
  bool threw = false;
  try {
    hfc::gmm_forward(params);
  } catch (const hfc::ArgumentError&) {
    threw = true;
  }
  CHECK(threw);
  params.layers[0].k = 1;
  params.layers[0].n = 0;  // empty batch: fine, writes nothing
  hfc::gmm_forward(params);
}
