"""The cache key of kernels/launch.py: it must change whenever Triton's specialisation would,
or a cached kernel compiled for other dtypes or alignments would be launched."""
import torch

from tritonbn.kernels.launch import specialisation_key


def test_key_separates_what_triton_specialises_on():
    x = torch.randn(64)
    base = specialisation_key((x, 16, 1, 0.1))
    assert specialisation_key((x.clone(), 16, 1, 0.1)) == base  # another tensor, same kind
    assert specialisation_key((x, 16, 1, 0.5)) == base  # floats are not specialised
    assert specialisation_key((x.double(), 16, 1, 0.1)) != base  # dtype
    assert specialisation_key((x[1:], 16, 1, 0.1)) != base  # 16-byte alignment
    assert specialisation_key((x, 17, 1, 0.1)) != base  # divisibility by 16
    assert specialisation_key((x, 16, 2, 0.1)) != base  # equality to 1
    assert specialisation_key((x, 16, 2**31, 0.1)) != base  # int width
