"""Docstring pieces that several public layers and functions share, written once."""

STATISTICS_ARGS = """\
eps: added to the variance before its square root, for numerical stability.
            Default: 1e-5
        momentum: how much of the current batch goes into the running statistics:
            ``running = (1 - momentum) * running + momentum * batch``. ``None`` makes them a
            cumulative average of every batch seen so far (weight 1 / num_batches_tracked).
            Default: 0.1
        affine: if ``True``, the layer learns a per-channel ``weight`` (starting at 1) and
            ``bias`` (starting at 0); if ``False``, both are ``None``. Default: ``True``"""

ACTIVATION_ARGS = """\
activation: the activation applied last, by name, one of
            ``tritonbn.SUPPORTED_ACTIVATIONS``. Default: ``"relu"``
        activation_kwargs: its keyword arguments as torch.nn.functional names them
            (``negative_slope`` for ``"leaky_relu"``, ``alpha`` for ``"elu"``,
            ``approximate`` for ``"gelu"``), over PyTorch's defaults; ``None`` keeps the
            defaults. An unknown activation or keyword raises ValueError. Default: ``None``"""
