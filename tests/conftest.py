"""Suite-wide settings and fixtures."""

import os
import sys
from pathlib import Path

import torch

# Without CUDA, backend "triton" runs on CPU tensors under the Triton interpreter, which must be chosen before
# anything imports triton (engine imports it lazily, when backend "triton" is first asked for; torch does not).
# With CUDA the Triton kernels are compiled and run on the GPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# The test helpers (tests/support.py) import as ``support`` whatever pytest's import mode and working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import support  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Test shapes are tiny: one torch thread beats several spinning OpenMP threads on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=support.BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each kernel backend by name: "cpu" (engine._C), "torch", "triton" (interpreted, on CPU tensors) and "cuda";
    skipped with the reason where unavailable. Move inputs with ``support.put``/``support.tensor``. Module scope
    (the value is an immutable name) so Hypothesis tests can use it."""
    reason = support.unavailable(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param
