// engine._C: the C++ CPU kernels. Each op file in bindings/ defines its register_<op> function.
#include <pybind11/pybind11.h>

#include <cblas.h>

#include "hfc/common.h"

namespace py = pybind11;

void register_gmm(py::module_& m);
void register_mahalanobis(py::module_& m);
void register_knn(py::module_& m);
void register_kde(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "hfc-engine C++ CPU kernels (OpenMP + SIMD + OpenBLAS)";
  // Kernels parallelise with OpenMP over rows/layers and call single-threaded BLAS inside.
  scipy_openblas_set_num_threads(1);
  py::register_exception<hfc::ArgumentError>(m, "ArgumentError", PyExc_ValueError);
  register_gmm(m);
  register_mahalanobis(m);
  register_knn(m);
  register_kde(m);
}
