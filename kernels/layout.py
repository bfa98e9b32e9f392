"""How the kernels view an (N, C, *spatial) tensor: as (N, C, S) with one stride per axis.

Contiguous, channels_last and channels_last_3d tensors all collapse so; a tensor whose spatial
dims do not is copied to contiguous before any kernel sees it (tritonbn.dispatch). Imports no
Triton.
"""
import functools

import torch


def strides_ncs(t: torch.Tensor):
    """(stride_n, stride_c, stride_s) viewing t as (N, C, S), or None if its spatial dims
    do not collapse into one evenly strided axis."""
    shape, strides = t.shape, t.stride()
    try:
        return _collapse_cached(shape, strides)
    except TypeError:  # symbolic sizes (fake tensors under torch.compile) do not hash
        return _collapse(shape, strides)


def _collapse(shape, strides):
    spatial = [(size, stride) for size, stride in zip(shape[2:], strides[2:]) if size != 1]
    for (_, outer), (size, inner) in zip(spatial, spatial[1:]):
        if outer != inner * size:
            return None
    # With no spatial extent, rows are the batch: flattened rows then always step by stride_s.
    stride_s = spatial[-1][1] if spatial else strides[0]
    return strides[0], strides[1], stride_s


_collapse_cached = functools.lru_cache(maxsize=4096)(_collapse)
