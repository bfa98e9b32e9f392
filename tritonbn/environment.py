"""What runs tritonbn on this machine: the path a tensor takes, the versions against the
supported ranges, the GPU, and the state of the direct launch path."""
import ctypes
import platform
import re

import torch
from torch import Tensor

from . import dispatch, reference
from ._version import __version__

# The oldest versions supported; pyproject.toml's requirements and README.md state the same
# (tests/test_release.py checks that they agree).
MINIMUM_VERSIONS = {"python": "3.10", "torch": "2.8", "triton": "3.4"}


def backend_for(x: Tensor) -> str:
    """Which path tritonbn runs x on: "kernels" (Triton compiled for the GPU), "interpreter"
    (the same kernels through Triton's interpreter, CPU tensors with TRITON_INTERPRET=1 set
    before triton was imported) or "reference" (no Triton: PyTorch's native ops in eager calls,
    tritonbn/reference.py inside the registered ops under torch.compile). Raises as a call
    would where the kernels are needed and Triton is missing."""
    if dispatch.backend(x) is reference:
        return "reference"
    return "interpreter" if x.device.type == "cpu" else "kernels"


def release(version: str) -> tuple:
    """The numeric release of a version string: "2.13.0+cu130" -> (2, 13, 0), "3.4" -> (3, 4)."""
    return tuple(int(n) for n in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def versions() -> dict:
    """name -> installed version (None where Triton is not installed)."""
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "triton": None, "tritonbn": __version__}
    if dispatch.HAS_TRITON:
        import triton
        found["triton"] = triton.__version__
    return found


def unsupported_versions() -> list[str]:
    """A line for each installed version below MINIMUM_VERSIONS."""
    found = versions()
    return [f"{name} {found[name]} is older than the {minimum} tritonbn needs"
            for name, minimum in MINIMUM_VERSIONS.items()
            if found[name] is not None and release(found[name]) < release(minimum)]


def direct_launch_state() -> str:
    """Whether compiled kernels are launched directly (kernels/launch.py), and why."""
    if not dispatch.HAS_TRITON:
        return "no Triton installed"
    from .kernels import launch
    return launch.direct_launch_state()


def gpu() -> str:
    """The current CUDA device, its compute capability and the driver, or why there is none."""
    if not torch.cuda.is_available():
        return "none (torch.cuda.is_available() is False)"
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if torch.version.hip is not None:
        runtime = f"ROCm/HIP {torch.version.hip}"
    else:
        runtime = f"CUDA {torch.version.cuda}, driver {_cuda_driver()}"
    return (f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}), "
            f"{runtime}")


def _cuda_driver() -> str:
    """The NVIDIA driver's version, from NVML (the library nvidia-smi reads)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        text = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() != 0 or nvml.nvmlSystemGetDriverVersion(text, 96) != 0:
            return "unknown (NVML failed)"
        return text.value.decode()
    except OSError as error:  # reporting only: a missing library is no failure
        return f"unknown ({error})"
