// engine._C.knn / engine._C.lid: numpy front ends of hfc::knn and hfc::lid (csrc/cpu/knn.cpp).
// One overload per dtype with no conversion (mixed or other dtypes raise TypeError); the GIL is released.
#include "hfc/knn.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "hfc/common.h"

namespace py = pybind11;

namespace {

template <typename T>
using Rows = py::array_t<T, py::array::c_style>;

template <typename T>
hfc::KnnParams params(const Rows<T>& x, const Rows<T>& ref, int64_t k, bool exclude_self, int64_t tile_queries,
                      int64_t tile_refs) {
  hfc::require(x.ndim() == 2, "x must have shape (N, d)");
  hfc::require(ref.ndim() == 2, "ref must have shape (M, d)");
  hfc::require(x.shape(1) == ref.shape(1), "x has " + std::to_string(x.shape(1)) + " columns but ref has " +
                                               std::to_string(ref.shape(1)));
  hfc::KnnParams p;
  p.n = x.shape(0);
  p.m = ref.shape(0);
  p.d = x.shape(1);
  p.k = k;
  p.exclude_self = exclude_self;
  if (tile_queries > 0) p.tile_queries = tile_queries;
  if (tile_refs > 0) p.tile_refs = tile_refs;
  hfc::knn_validate(p);
  return p;
}

template <typename T>
void define(py::module_& m) {
  m.def(
      "knn",
      [](const Rows<T>& x, const Rows<T>& ref, int64_t k, bool exclude_self, int64_t tile_queries, int64_t tile_refs) {
        const hfc::KnnParams p = params(x, ref, k, exclude_self, tile_queries, tile_refs);
        Rows<T> dist({p.n, p.k});
        py::array_t<int64_t> index({p.n, p.k});
        {
          py::gil_scoped_release release;
          hfc::knn(p, x.data(), ref.data(), dist.mutable_data(), index.mutable_data());
        }
        return py::make_tuple(dist, index);
      },
      py::arg("x").noconvert(), py::arg("ref").noconvert(), py::arg("k"), py::arg("exclude_self") = false,
      py::arg("tile_queries") = 0, py::arg("tile_refs") = 0,
      "(dist (N,k) ascending Euclidean distances, index (N,k) int64) of the k nearest rows of ref.\n"
      "tile_queries/tile_refs: GEMM block sizes (0 = hfc::kKnnTileQueries / kKnnTileRefs).");
  m.def(
      "lid",
      [](const Rows<T>& x, const Rows<T>& ref, int64_t k, bool exclude_self, int64_t tile_queries, int64_t tile_refs) {
        const hfc::KnnParams p = params(x, ref, k, exclude_self, tile_queries, tile_refs);
        Rows<T> out(p.n);
        {
          py::gil_scoped_release release;
          hfc::lid(p, x.data(), ref.data(), out.mutable_data());
        }
        return out;
      },
      py::arg("x").noconvert(), py::arg("ref").noconvert(), py::arg("k"), py::arg("exclude_self") = false,
      py::arg("tile_queries") = 0, py::arg("tile_refs") = 0,
      "(N,) LID = -(mean_i log(r_i / r_k))^-1 from the k nearest rows of ref.");
}

}  // namespace

void register_knn(py::module_& m) {
  define<float>(m);
  define<double>(m);
}
