"""The activation codes the kernels take as a constexpr, one per fused activation (their names
and keyword arguments: tritonbn/activations.py). Imports no Triton."""
IDENTITY = 0
RELU = 1
SIGMOID = 2
RELU6 = 3
LEAKY_RELU = 4
ELU = 5
SILU = 6
HARDSWISH = 7
HARDSIGMOID = 8
GELU = 9
GELU_TANH = 10
MISH = 11
TANH = 12
