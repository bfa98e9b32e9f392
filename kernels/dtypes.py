"""The dtypes the kernels compute in, shared with the reference path. Imports no Triton."""
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and per-element arithmetic: float32, or float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32
