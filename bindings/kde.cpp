// engine._C.kde: numpy front end of hfc::kde_log_density (csrc/cpu/kde.cpp).
// One overload per dtype with no conversion (mixed or other dtypes raise TypeError); the GIL is released.
#include "hfc/kde.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "hfc/common.h"

namespace py = pybind11;

namespace {

template <typename T>
using Rows = py::array_t<T, py::array::c_style>;

template <typename T>
void define(py::module_& m) {
  m.def(
      "kde",
      [](const Rows<T>& x, const Rows<T>& ref, double bandwidth, int64_t tile_queries, int64_t tile_refs) {
        hfc::require(x.ndim() == 2, "x must have shape (N, d)");
        hfc::require(ref.ndim() == 2, "ref must have shape (M, d)");
        hfc::require(x.shape(1) == ref.shape(1), "x has " + std::to_string(x.shape(1)) + " columns but ref has " +
                                                     std::to_string(ref.shape(1)));
        hfc::KdeParams p;
        p.n = x.shape(0);
        p.m = ref.shape(0);
        p.d = x.shape(1);
        p.bandwidth = bandwidth;
        if (tile_queries > 0) p.tile_queries = tile_queries;
        if (tile_refs > 0) p.tile_refs = tile_refs;
        hfc::kde_validate(p);
        Rows<T> out(p.n);
        {
          py::gil_scoped_release release;
          hfc::kde_log_density(p, x.data(), ref.data(), out.mutable_data());
        }
        return out;
      },
      py::arg("x").noconvert(), py::arg("ref").noconvert(), py::arg("bandwidth"),
      py::arg("tile_queries") = 0, py::arg("tile_refs") = 0,
      "(N,) Gaussian KDE log density of x under ref (sklearn KernelDensity(kernel='gaussian')).\n"
      "tile_queries/tile_refs: GEMM block sizes (0 = hfc::kKdeTileQueries / kKdeTileRefs).");
}

}  // namespace

void register_kde(py::module_& m) {
  define<float>(m);
  define<double>(m);
}
