// engine._C.gmm: numpy front end of hfc::gmm_forward (csrc/cpu/gmm.cpp). Dispatches on float32/float64
// explicitly (no silent dtype conversion), checks shapes, releases the GIL while the kernel runs.
#include "hfc/gmm.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "hfc/common.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <typename T>
const T* checked(const py::array& a, const std::string& name, std::vector<py::ssize_t> shape) {
  // Messages are built only on failure: this runs for every array of every call (attacks call once per step).
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw hfc::ArgumentError(name + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + " like x, got " +
                             std::string(py::str(a.dtype())));
  }
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + (shape[i] < 0 ? "?" : std::to_string(shape[i]));
    throw hfc::ArgumentError(name + " must have shape " + want + (shape.size() == 1 ? ",)" : ")") + ", got " +
                             shape_str(a));
  }
  if (!(a.flags() & py::array::c_style)) throw hfc::ArgumentError(name + " must be C-contiguous");
  return static_cast<const T*>(a.data());
}

template <typename T>
py::list run(const py::list& layers, hfc::GmmMode mode, bool need_grad, int64_t row_tile, int64_t simd_max_dim) {
  hfc::GmmParams<T> params;
  params.mode = mode;
  params.row_tile = row_tile;
  params.simd_max_dim = simd_max_dim;
  py::list out;
  for (size_t l = 0; l < layers.size(); ++l) {
    const std::string where = "layer " + std::to_string(l) + ": ";
    auto entry = layers[l].cast<py::tuple>();
    hfc::require(entry.size() == 4 || entry.size() == 5,
                 where + "expected a tuple (x, means, prec_chol, log_norm[, packed])");
    auto x = entry[0].cast<py::array>();
    auto means = entry[1].cast<py::array>();
    auto prec = entry[2].cast<py::array>();
    auto log_norm = entry[3].cast<py::array>();
    hfc::require(x.ndim() == 2, where + "x must have shape (N, d), got " + shape_str(x));
    hfc::require(means.ndim() == 2, where + "means must have shape (K, d), got " + shape_str(means));
    const py::ssize_t n = x.shape(0), d = x.shape(1), k = means.shape(0);
    hfc::GmmLayer<T> L;
    L.x = checked<T>(x, where + "x", {n, d});
    L.means = checked<T>(means, where + "means", {k, d});
    L.prec_chol = checked<T>(prec, where + "prec_chol", {k, d, d});
    L.log_norm = checked<T>(log_norm, where + "log_norm", {k});
    L.n = n;
    L.d = d;
    L.k = k;
    if (entry.size() == 5 && !entry[4].is_none()) {
      L.packed = checked<T>(entry[4].cast<py::array>(), where + "packed", {hfc::gmm_packed_size<T>(d, k)});
    }
    py::array_t<T> value(n);
    py::array_t<int64_t> component(n);
    py::object grad = py::none();
    L.value = value.mutable_data();
    L.component = component.mutable_data();
    if (need_grad) {
      py::array_t<T> g({n, d});
      L.grad = g.mutable_data();
      grad = g;
    }
    params.layers.push_back(L);
    out.append(py::make_tuple(value, grad, component));
  }
  hfc::gmm_validate(params);
  {
    py::gil_scoped_release release;
    hfc::gmm_forward(params);
  }
  return out;
}

template <typename T>
py::array pack(const py::array& prec_chol) {
  hfc::require(prec_chol.ndim() == 3 && prec_chol.shape(1) == prec_chol.shape(2) && prec_chol.shape(0) >= 1 &&
                   prec_chol.shape(1) >= 1,
               "prec_chol must have shape (K, d, d) with K, d >= 1, got " + shape_str(prec_chol));
  const int64_t k = prec_chol.shape(0), d = prec_chol.shape(1);
  const T* u = checked<T>(prec_chol, "prec_chol", {k, d, d});
  py::array_t<T> out(hfc::gmm_packed_size<T>(d, k));
  T* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    hfc::gmm_pack(u, d, k, dst);
  }
  return out;
}

}  // namespace

void register_gmm(py::module_& m) {
  m.def(
      "gmm",
      [](const py::list& layers, const std::string& mode, bool need_grad, int64_t row_tile, int64_t simd_max_dim) {
        hfc::GmmMode kind;
        if (mode == "loglik") {
          kind = hfc::GmmMode::kLogLik;
        } else if (mode == "nearest") {
          kind = hfc::GmmMode::kNearest;
        } else {
          throw hfc::ArgumentError("mode must be 'loglik' or 'nearest', got '" + mode + "'");
        }
        if (layers.size() == 0) return py::list();
        auto x0 = layers[0].cast<py::tuple>()[0].cast<py::array>();
        if (x0.dtype().is(py::dtype::of<float>())) return run<float>(layers, kind, need_grad, row_tile, simd_max_dim);
        if (x0.dtype().is(py::dtype::of<double>())) return run<double>(layers, kind, need_grad, row_tile, simd_max_dim);
        throw hfc::ArgumentError("x must be float32 or float64, got " + std::string(py::str(x0.dtype())));
      },
      py::arg("layers"), py::arg("mode") = "loglik", py::arg("need_grad") = true, py::arg("row_tile") = 0,
      py::arg("simd_max_dim") = hfc::kGmmSimdMaxDim,
      R"doc(Fused GMM log-likelihood (or nearest-component Mahalanobis) and input gradient, all layers in one call.

layers: list of (x (N,d), means (K,d), prec_chol (K,d,d) upper-triangular, log_norm (K,)[, packed]), one dtype
(float32 or float64), C-contiguous; packed = gmm_pack(prec_chol) (or None) saves repacking a reused mixture.
row_tile (0 = automatic) and simd_max_dim (largest d for the SIMD triangular products; 0 = OpenBLAS trmm always)
are tuning overrides. Returns a list of (value (N,), grad (N,d) or None, component (N,) int64).)doc");
  const char* pack_doc = R"doc(The SIMD kernels' packed copy of prec_chol (K,d,d) (float32 or float64, C-contiguous):
pass it as the fifth element of a gmm layer entry when the same mixture is evaluated many times.)doc";
  m.def(
      "gmm_pack",
      [](const py::array& prec_chol) {
        if (prec_chol.dtype().is(py::dtype::of<float>())) return pack<float>(prec_chol);
        if (prec_chol.dtype().is(py::dtype::of<double>())) return pack<double>(prec_chol);
        throw hfc::ArgumentError("prec_chol must be float32 or float64, got " +
                                 std::string(py::str(prec_chol.dtype())));
      },
      py::arg("prec_chol"), pack_doc);
  m.attr("gmm_simd_max_dim") = hfc::kGmmSimdMaxDim;
}
