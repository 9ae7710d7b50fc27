"""Build engine._C (C++ CPU kernels) and, where nvcc is found, engine._C_cuda.

Environment switches:
  HFC_ENGINE_PORTABLE=1   build without -march=native (portable wheels).
  HFC_ENGINE_CUDA=1|0     force the CUDA extension on or off (default: on when nvcc is found).
  HFC_ENGINE_CUDA_ARCH    CUDA architectures, e.g. "80;90" (default), SASS for each plus PTX of the last.
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pat in patterns for p in ROOT.glob(pat))


HEADERS = _sources("csrc/include/hfc/*.h", "csrc/cuda/*.cuh")


def _needs_recompile(obj: str, src: str) -> bool:
    """Incremental builds: recompile when the source or any shared header is newer than the object."""
    if not os.path.exists(obj):
        return True
    newest_input = max(os.stat(ROOT / p).st_mtime for p in [src, *HEADERS])
    return os.stat(obj).st_mtime < newest_input


ParallelCompile("HFC_ENGINE_JOBS", default=2, needs_recompile=_needs_recompile).install()


def _openblas():
    import scipy_openblas32

    return scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library()


def _cpu_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if os.environ.get("HFC_ENGINE_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


def _cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME, else /usr/local/cuda*, else the directory above nvcc."""
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for cand in candidates:
        if cand and (Path(cand) / "include" / "cuda_runtime.h").exists():
            return Path(cand)
    return None


def _want_cuda() -> bool:
    flag = os.environ.get("HFC_ENGINE_CUDA")
    if flag is not None:
        return flag == "1"
    return shutil.which("nvcc") is not None and _cuda_home() is not None and bool(_sources("csrc/cuda/*.cu"))


class BuildExt(build_ext):
    """pybind11's build_ext plus compiling csrc/cuda/*.cu with nvcc for engine._C_cuda."""

    def build_extension(self, ext):
        if ext.name == "engine._C_cuda":
            self._compile_cuda(ext)
        super().build_extension(ext)

    def _compile_cuda(self, ext):
        nvcc = shutil.which("nvcc") or str(_cuda_home() / "bin" / "nvcc")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in _sources("csrc/cuda/*.cu"):
            obj = out_dir / (Path(src).stem + ".o")
            if _needs_recompile(str(obj), src):
                cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-lineinfo", *_cuda_arch_flags(),
                       "-Xcompiler", "-fPIC", "-Icsrc/include"]
                print(" ".join(cmd), file=sys.stderr)
                subprocess.check_call(cmd, cwd=ROOT)
            objects.append(str(obj))
        ext.extra_objects = objects


def _cuda_arch_flags() -> list[str]:
    """SASS for each listed architecture plus PTX of the newest, so newer GPUs can JIT it."""
    archs = os.environ.get("HFC_ENGINE_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    numbers = [a.strip().removeprefix("sm_") for a in archs if a.strip()]
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
    return [*flags, f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}"]


def _record_commit() -> None:
    """Write the checkout's git commit to engine/BUILD_COMMIT (gitignored, installed with the package; the run card
    reads it). Outside a checkout (a build from an sdist) the file is left as it is."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return
    if out.returncode == 0 and out.stdout.strip():
        (ROOT / "engine" / "BUILD_COMMIT").write_text(out.stdout.strip() + "\n")


_record_commit()
blas_include, blas_lib_dir, blas_lib = _openblas()
extensions = [
    Pybind11Extension(
        "engine._C",
        _sources("bindings/*.cpp", "csrc/cpu/*.cpp"),
        include_dirs=["csrc/include", blas_include],
        library_dirs=[blas_lib_dir],
        libraries=[blas_lib],
        runtime_library_dirs=[blas_lib_dir, "$ORIGIN/../scipy_openblas32/lib"],
        depends=HEADERS,
        extra_compile_args=_cpu_flags(),
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
]
if _want_cuda():
    cuda_home = _cuda_home()
    if cuda_home is None:
        raise RuntimeError("HFC_ENGINE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
    cuda_libs = [str(d) for d in (cuda_home / "lib64", cuda_home / "lib") if d.is_dir()]
    extensions.append(
        Pybind11Extension(
            "engine._C_cuda",
            _sources("bindings/cuda/*.cpp"),
            include_dirs=["csrc/include", str(cuda_home / "include")],
            library_dirs=cuda_libs,
            libraries=["cudart"],
            runtime_library_dirs=cuda_libs,
            depends=HEADERS,
            extra_compile_args=["-O3"],
            cxx_std=17,
        )
    )

setup(
    # engine.kernels is kernels/; engine.presets is configs/ (the shipped configs, `hfc-engine run <name>`)
    packages=find_packages(include=["engine", "engine.*"]) + ["engine.kernels", "engine.presets"],
    package_dir={"engine.kernels": "kernels", "engine.presets": "configs"},
    package_data={"engine": ["BUILD_COMMIT"], "engine.presets": ["*.yaml"]},
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExt},
)
