// SCAFFOLD: replaced by the real binding of the knn kernels.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_knn(py::module_& m) { (void)m; }
