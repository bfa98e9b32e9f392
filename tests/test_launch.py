"""kernels/launch.py: the cache key must change whenever Triton's specialisation would, or a
kernel compiled for other dtypes or alignments would be launched; and a cached launch must
hand the launcher what Triton's own launch path would. The cached path runs only on a GPU,
so the second test drives it with a stand-in JIT function and driver."""
from types import SimpleNamespace

import torch

from tritonbn.kernels import launch
from tritonbn.kernels.launch import CachedLaunch, specialisation_key


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

    def __getitem__(self, grid):
        def compile_and_launch(*args, **kwargs):
            self.compiled.append((grid, args, kwargs))
            return self.kernel
        return compile_and_launch


def test_cached_launch_hands_the_launcher_every_argument(monkeypatch):
    monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", True)
    stand_in = SimpleNamespace(get_current_device=lambda: 0,
                               get_current_stream=lambda device: 1234)
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=stand_in))
    jit_fn = _JitFunction()
    jit_fn.kernel = _CompiledKernel()
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    kernel[(3, 2)](x, 100, 1e-5, BLOCK=64, ACC="fp32", num_warps=4)
    assert len(jit_fn.compiled) == 1 and not jit_fn.kernel.launches  # Triton launched it
    kernel[(3, 2)](x, 100, 2e-5, BLOCK=64, ACC="fp32", num_warps=4)  # another float: cached
    kernel[(5,)](x, 100, 2e-5, BLOCK=64, ACC="fp32", num_warps=4)
    assert len(jit_fn.compiled) == 1
    first, second = jit_fn.kernel.launches
    # grid padded to 3-D, stream, function, metadata, no hooks, then every parameter in order
    assert first == (3, 2, 1, 1234, "function", "packed", None, None, None,
                     x, 100, 2e-5, 64, "fp32")
    assert second[:3] == (5, 1, 1)
    kernel[(3, 2)](x, 100, 2e-5, BLOCK=128, ACC="fp32", num_warps=4)  # another constexpr
    kernel[(3, 2)](x.double(), 100, 2e-5, BLOCK=64, ACC="fp32", num_warps=4)  # another dtype
    assert len(jit_fn.compiled) == 3
    # A profiler's hook gets the launch metadata.
    hook = SimpleNamespace(calls=[print])
    runtime = SimpleNamespace(launch_enter_hook=hook, launch_exit_hook=None)
    monkeypatch.setattr(launch, "knobs", SimpleNamespace(runtime=runtime))
    kernel[(3, 2)](x, 100, 2e-5, BLOCK=64, ACC="fp32", num_warps=4)
    assert jit_fn.kernel.launches[-1][6:9] == ("metadata", hook, None)
