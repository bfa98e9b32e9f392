"""kernels/launch.py: a cached launch must hand the launcher what Triton's own launch path
would, and take Triton's path whenever the cache cannot vouch for the call. The cached path
runs only on a GPU, so these tests drive it with a stand-in JIT function and driver. A last
test checks the launchers' cache keys against everything Triton specialises on."""
from types import SimpleNamespace

import pytest
import torch

import tritonbn
from tritonbn.kernels import launch
from tritonbn.kernels.launch import CachedLaunch, Launch
from conftest import DEVICE, make_input, make_params


class _CompiledKernel:
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)

    def launch_metadata(self, grid, stream, *args):
        return "metadata"


class _JitFunction:
    """Compiles on the first call of each kind; Triton's path launches that call itself."""
    params = [SimpleNamespace(name=name, is_constexpr=name.isupper())
              for name in ("x_ptr", "n", "eps", "BLOCK", "ACC")]

    def __init__(self):
        self.compiled = []
        self.kernel = _CompiledKernel()

    def __getitem__(self, grid):
        def compile_and_launch(*args, **kwargs):
            self.compiled.append((grid, args, kwargs))
            return self.kernel
        return compile_and_launch


@pytest.fixture
def direct(monkeypatch):
    """The direct launch path, on a stand-in driver."""
    monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", True)
    stand_in = SimpleNamespace(get_current_device=lambda: 0,
                               get_current_stream=lambda device: 1234)
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=stand_in))


def bind(grid=(3, 2), block=64):
    return lambda: Launch(grid, (100,), {"BLOCK": block, "ACC": "fp32", "num_warps": 4})


def test_cached_launch_hands_the_launcher_every_argument(direct, monkeypatch):
    jit_fn = _JitFunction()
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    kernel.launch("a", (x,), (1e-5,), bind())
    assert len(jit_fn.compiled) == 1 and not jit_fn.kernel.launches  # Triton launched it
    assert jit_fn.compiled[0] == ((3, 2), (x, 100, 1e-5),
                                  {"BLOCK": 64, "ACC": "fp32", "num_warps": 4})
    kernel.launch("a", (x,), (2e-5,), bind())  # another float: cached
    kernel.launch("b", (x,), (2e-5,), bind(grid=(5,)))
    kernel.launch("b", (x,), (2e-5,), bind(grid=(5,)))
    assert len(jit_fn.compiled) == 2
    first, second = jit_fn.kernel.launches
    # grid padded to 3-D, stream, function, metadata, no hooks, then every parameter in order
    assert first == (3, 2, 1, 1234, "function", "packed", None, None, None,
                     x, 100, 2e-5, 64, "fp32")
    assert second[:3] == (5, 1, 1)
    # A profiler's hook gets the launch metadata.
    hook = SimpleNamespace(calls=[print])
    runtime = SimpleNamespace(launch_enter_hook=hook, launch_exit_hook=None)
    monkeypatch.setattr(launch, "knobs", SimpleNamespace(runtime=runtime))
    kernel.launch("a", (x,), (2e-5,), bind())
    assert jit_fn.kernel.launches[-1][6:9] == ("metadata", hook, None)


def test_misaligned_tensors_take_tritons_path(direct):
    jit_fn = _JitFunction()
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    kernel.launch("a", (x[1:],), (1e-5,), bind())  # not 16-byte aligned: nothing cached
    kernel.launch("a", (x,), (1e-5,), bind())
    kernel.launch("a", (x[1:],), (1e-5,), bind())  # cached for aligned tensors only
    kernel.launch("a", (x,), (1e-5,), bind())
    assert len(jit_fn.compiled) == 3 and len(jit_fn.kernel.launches) == 1


def test_bind_runs_only_for_a_new_key(direct):
    jit_fn = _JitFunction()
    kernel = CachedLaunch(jit_fn)
    calls = []

    def counted():
        calls.append(1)
        return bind()()
    x = torch.randn(64)
    for _ in range(3):
        kernel.launch("a", (x,), (1e-5,), counted)
    assert len(calls) == 1


def _specialisation(args, kwargs):
    """What Triton specialises a launch on: each tensor's dtype, each int's value (finer than
    Triton's width, divisibility by 16 and equality to 1), each float's type, the keywords."""
    return (tuple(arg.dtype if isinstance(arg, torch.Tensor) else
                  arg if isinstance(arg, int) else type(arg) for arg in args),
            tuple(sorted(kwargs.items())))


def test_launcher_keys_separate_what_triton_specialises_on(monkeypatch):
    """Run the launchers over shapes, layouts, dtypes and flags, recording for each cache key
    what Triton would specialise on: one key must never stand for two specialisations."""
    seen = {}
    original = CachedLaunch.launch

    def recording(self, cache_key, tensors, floats, bind):
        bound = bind()
        spec = _specialisation(tensors + bound.ints + floats, bound.constexprs)
        assert seen.setdefault((self.jit_fn, cache_key), spec) == spec
        return original(self, cache_key, tensors, floats, bind)

    monkeypatch.setattr(CachedLaunch, "launch", recording)
    for shape, layout in (((3, 5, 4, 2), "channels_last"), ((3, 5, 4, 2), "contiguous"),
                          ((4, 5, 2, 4), "contiguous"), ((6, 5), "contiguous")):
        for dtype in (torch.float32, torch.float64):
            for affine in (True, False):
                for activation in ("relu", "identity"):
                    x = make_input(shape, dtype, layout, requires_grad=True)
                    weight, bias, running_mean, running_var = make_params(shape[1], dtype)
                    params = (weight, bias) if affine else (None, None)
                    for training in (True, False):
                        y = tritonbn.bn_act(x, running_mean, running_var, *params, training,
                                            activation=activation)
                        y.backward(torch.randn_like(y))
    m = tritonbn.BatchNormAct2d(5, momentum=None, device=DEVICE)
    m(make_input((3, 5, 4, 2)))
    assert len(seen) > 20
