// engine._C.mahalanobis: numpy front end of hfc::mahalanobis (csrc/cpu/mahalanobis.cpp), all layers in one call.
// One overload per dtype with no conversion (mixed or other dtypes raise TypeError); the GIL is released.
#include "hfc/mahalanobis.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "hfc/common.h"

namespace py = pybind11;

namespace {

template <typename T>
using Rows = py::array_t<T, py::array::c_style>;

template <typename T>
using Layer = std::tuple<Rows<T>, Rows<T>, Rows<T>>;  // (x (N,d), means (C,d), precision (d,d))

template <typename T>
std::vector<Rows<T>> run(const std::vector<Layer<T>>& layers, int64_t row_tile) {
  hfc::MahalanobisParams<T> params;
  if (row_tile > 0) params.row_tile = row_tile;
  std::vector<Rows<T>> outs;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& [x, means, precision] = layers[l];
    const std::string where = layers.size() > 1 ? " (layer " + std::to_string(l) + ")" : "";
    hfc::require(x.ndim() == 2, "x must have shape (N, d)" + where);
    hfc::require(means.ndim() == 2 && means.shape(1) == x.shape(1),
                 "means must have shape (C, " + std::to_string(x.shape(1)) + ")" + where);
    hfc::require(precision.ndim() == 2 && precision.shape(0) == x.shape(1) && precision.shape(1) == x.shape(1),
                 "precision must have shape (" + std::to_string(x.shape(1)) + ", " + std::to_string(x.shape(1)) +
                     ")" + where);
    hfc::MahalanobisLayer<T> L;
    L.n = x.shape(0);
    L.c = means.shape(0);
    L.d = x.shape(1);
    outs.emplace_back(std::vector<py::ssize_t>{L.n, L.c});
    L.x = x.data();
    L.means = means.data();
    L.precision = precision.data();
    L.out = outs.back().mutable_data();
    params.layers.push_back(L);
  }
  hfc::mahalanobis_validate(params);
  {
    py::gil_scoped_release release;
    hfc::mahalanobis(params);
  }
  return outs;
}

}  // namespace

void register_mahalanobis(py::module_& m) {
  const char* doc = R"doc(Squared Mahalanobis distances for several layers in one call.

layers: list of (x (N,d), means (C,d), precision (d,d)), one dtype (float32 or float64), C-contiguous.
Returns a list of (N,C) arrays (x - mu_c)^T P (x - mu_c). Non-positive-definite precision -> ValueError.
row_tile: rows per work item (0 = hfc::kMahalanobisRowTile).)doc";
  m.def("mahalanobis", &run<float>, py::arg("layers").noconvert(), py::arg("row_tile") = 0, doc);
  m.def("mahalanobis", &run<double>, py::arg("layers").noconvert(), py::arg("row_tile") = 0, doc);
}
