// engine._C_cuda: the CUDA kernels of csrc/cuda behind plain integers (no torch C++ API).
//
// Python passes device pointers (tensor.data_ptr() of C-contiguous device tensors, outputs allocated by torch),
// sizes, and the cudaStream_t as an int (torch.cuda.current_stream().cuda_stream); the launchers enqueue work on
// that stream and return at once, with the GIL released. Argument errors raise ValueError, CUDA failures
// RuntimeError("CUDA error in <op>: <cuda error string>").
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "hfc/cuda_ops.h"

namespace py = pybind11;
using namespace hfc::cuda;

namespace {

template <typename P>
P* ptr(std::uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

cudaStream_t stream_of(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hfc-engine CUDA kernels: pointers, sizes and a stream in; results written to caller-owned outputs";

  m.def(
      "device_count",
      [] {
        int count = 0;
        return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
      },
      "Number of CUDA devices the runtime can use (0 without a device or driver).");

  py::enum_<DType>(m, "DType").value("float32", DType::kFloat32).value("float64", DType::kFloat64);

  py::class_<GmmLayer>(m, "GmmLayer", "One layer of a fused GMM call (device pointers as ints; 0 = none)")
      .def(py::init([](std::uintptr_t x, std::uintptr_t means, std::uintptr_t prec_chol, std::uintptr_t log_norm,
                       std::uintptr_t value, std::uintptr_t grad, std::uintptr_t work, std::uintptr_t component,
                       int64_t n, int d, int k) {
             return GmmLayer{ptr<const void>(x),     ptr<const void>(means), ptr<const void>(prec_chol),
                             ptr<const void>(log_norm), ptr<void>(value),  ptr<void>(grad),
                             ptr<void>(work),         ptr<int64_t>(component), n, d, k};
           }),
           py::kw_only(), py::arg("x"), py::arg("means"), py::arg("prec_chol"), py::arg("log_norm"), py::arg("value"),
           py::arg("grad"), py::arg("work"), py::arg("component"), py::arg("n"), py::arg("d"), py::arg("k"));

  py::class_<MahalanobisLayer>(m, "MahalanobisLayer", "One layer of a fused Mahalanobis call (device pointers)")
      .def(py::init([](std::uintptr_t x, std::uintptr_t centre, std::uintptr_t factor, std::uintptr_t proj_means,
                       std::uintptr_t out, int64_t n, int d, int c) {
             return MahalanobisLayer{ptr<const void>(x),          ptr<const void>(centre), ptr<const void>(factor),
                                     ptr<const void>(proj_means), ptr<void>(out),          n,
                                     d,                           c};
           }),
           py::kw_only(), py::arg("x"), py::arg("centre"), py::arg("factor"), py::arg("proj_means"), py::arg("out"),
           py::arg("n"), py::arg("d"), py::arg("c"));

  m.def(
      "gmm",
      [](DType dtype, bool nearest, const std::vector<GmmLayer>& layers, std::uintptr_t stream) {
        gmm(GmmParams{dtype, nearest}, layers, stream_of(stream));
      },
      py::kw_only(), py::arg("dtype"), py::arg("nearest"), py::arg("layers"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Fused multi-layer GMM log p(x) (nearest=False) or nearest-component squared Mahalanobis distance, the most "
      "likely component, and the gradient of the value w.r.t. x where a layer has a grad pointer.");

  m.def(
      "mahalanobis",
      [](DType dtype, const std::vector<MahalanobisLayer>& layers, std::uintptr_t stream) {
        mahalanobis(dtype, layers, stream_of(stream));
      },
      py::kw_only(), py::arg("dtype"), py::arg("layers"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Fused multi-layer squared Mahalanobis distances ||(x - centre) U - proj_means_c||^2.");

  m.def(
      "knn",
      [](DType dtype, std::uintptr_t x, std::uintptr_t ref, std::uintptr_t centre, std::uintptr_t dist,
         std::uintptr_t index, std::uintptr_t work, int64_t n, int64_t mrows, int d, int k, bool exclude_self,
         std::uintptr_t stream) {
        knn(KnnParams{dtype, ptr<const void>(x), ptr<const void>(ref), ptr<const void>(centre), ptr<void>(dist),
                      ptr<int64_t>(index), ptr<void>(work), n, mrows, d, k, exclude_self},
            stream_of(stream));
      },
      py::kw_only(), py::arg("dtype"), py::arg("x"), py::arg("ref"), py::arg("centre"), py::arg("dist"),
      py::arg("index"), py::arg("work"), py::arg("n"), py::arg("m"), py::arg("d"), py::arg("k"),
      py::arg("exclude_self"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "k nearest references: (n, k) ascending Euclidean distances and int64 indices; work holds n + m scalars.");

  m.def(
      "kde",
      [](DType dtype, std::uintptr_t x, std::uintptr_t ref, std::uintptr_t centre, std::uintptr_t out,
         std::uintptr_t work, int64_t n, int64_t mrows, int d, double bandwidth, std::uintptr_t stream) {
        kde(KdeParams{dtype, ptr<const void>(x), ptr<const void>(ref), ptr<const void>(centre), ptr<void>(out),
                      ptr<void>(work), n, mrows, d, bandwidth},
            stream_of(stream));
      },
      py::kw_only(), py::arg("dtype"), py::arg("x"), py::arg("ref"), py::arg("centre"), py::arg("out"),
      py::arg("work"), py::arg("n"), py::arg("m"), py::arg("d"), py::arg("bandwidth"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Gaussian KDE log density (sklearn KernelDensity normalisation); work holds n + m scalars.");
}
