// SCAFFOLD: replaced by the real binding of the kde kernels.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_kde(py::module_& m) { (void)m; }
