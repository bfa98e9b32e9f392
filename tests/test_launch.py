"""kernels/launch.py: a cached launch must hand the launcher what Triton's own launch path
would, and take Triton's path whenever the cache cannot vouch for the call: on a Triton version
no GPU run has validated, when TRITONBN_DIRECT_LAUNCH=0, and for a kernel whose direct launch
raised. The cached path runs only on a GPU, so these tests drive it with a stand-in JIT
function and driver; on a GPU a last test compares it with Triton's path on the real kernels.
Another checks the launchers' cache keys against everything Triton specialises on."""
import importlib.util
import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch
import triton

import tritonbn
from tritonbn import kernels
from tritonbn.activations import activation_kwargs, activation_spec
from tritonbn.kernels import launch
from tritonbn.kernels.launch import CachedLaunch, DirectLaunchFallbackWarning, Launch
from conftest import DEVICE, gpu_only, make_input, make_params


class _CompiledKernel:
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)

    def launch_metadata(self, grid, stream, *args):
        return "metadata"


class _RaisingKernel(_CompiledKernel):
    """A compiled kernel whose launcher wants other arguments, as a new Triton's might."""

    def run(self, *args):
        raise TypeError(f"function takes 15 positional arguments but {len(args)} were given")


class _JitFunction:
    """Compiles on the first call of each kind; Triton's path launches that call itself."""
    params = [SimpleNamespace(name=name, is_constexpr=name.isupper())
              for name in ("x_ptr", "n", "eps", "BLOCK", "ACC")]

    def __init__(self, kernel=None):
        self.__name__ = "stand_in_kernel"
        self.compiled = []
        self.kernel = kernel or _CompiledKernel()

    def __getitem__(self, grid):
        def compile_and_launch(*args, **kwargs):
            self.compiled.append((grid, args, kwargs))
            return self.kernel
        return compile_and_launch


@pytest.fixture
def direct(monkeypatch):
    """The direct launch path, on a stand-in driver."""
    monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", True)
    monkeypatch.setattr(launch, "PROVE_LAUNCHES", False)
    stand_in = SimpleNamespace(get_current_device=lambda: 0,
                               get_current_stream=lambda device: 1234)
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=stand_in))


@pytest.fixture
def proving(direct, monkeypatch):
    """The direct launch path on a Triton version not validated: variants prove themselves."""
    monkeypatch.setattr(launch, "PROVE_LAUNCHES", True)
    monkeypatch.setattr(launch, "LAUNCH_MODE_WHY",
                        launch.direct_launches("", "3.9.0", False, False)[1])


def bind(grid=(3, 2), block=64):
    return lambda: Launch(grid, {"n": 100, "BLOCK": block, "ACC": "fp32", "num_warps": 4})


def test_cached_launch_hands_the_launcher_every_argument(direct, monkeypatch):
    jit_fn = _JitFunction()
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    kernel.launch("a", bind(), x_ptr=x, eps=1e-5)
    assert len(jit_fn.compiled) == 1 and not jit_fn.kernel.launches  # Triton launched it
    assert jit_fn.compiled[0] == ((3, 2), (), {"x_ptr": x, "eps": 1e-5, "n": 100, "BLOCK": 64,
                                               "ACC": "fp32", "num_warps": 4})
    kernel.launch("a", bind(), x_ptr=x, eps=2e-5)  # another float: cached
    kernel.launch("b", bind(grid=(5,)), x_ptr=x, eps=2e-5)
    kernel.launch("b", bind(grid=(5,)), x_ptr=x, eps=2e-5)
    assert len(jit_fn.compiled) == 2
    first, second = jit_fn.kernel.launches
    # grid padded to 3-D, stream, function, metadata, no hooks, then every parameter in the
    # kernel's order, wherever the call and bind() named it
    assert first == (3, 2, 1, 1234, "function", "packed", None, None, None,
                     x, 100, 2e-5, 64, "fp32")
    assert second[:3] == (5, 1, 1)
    # A profiler's hook gets the launch metadata.
    hook = SimpleNamespace(calls=[print])
    runtime = SimpleNamespace(launch_enter_hook=hook, launch_exit_hook=None)
    monkeypatch.setattr(launch, "knobs", SimpleNamespace(runtime=runtime))
    kernel.launch("a", bind(), x_ptr=x, eps=2e-5)
    assert jit_fn.kernel.launches[-1][6:9] == ("metadata", hook, None)


def test_misaligned_tensors_take_tritons_path(direct):
    jit_fn = _JitFunction()
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    kernel.launch("a", bind(), x_ptr=x[1:], eps=1e-5)  # not 16-byte aligned: nothing cached
    kernel.launch("a", bind(), x_ptr=x, eps=1e-5)
    kernel.launch("a", bind(), x_ptr=x[1:], eps=1e-5)  # cached for aligned tensors only
    kernel.launch("a", bind(), x_ptr=x, eps=1e-5)
    assert len(jit_fn.compiled) == 3 and len(jit_fn.kernel.launches) == 1


def test_a_tensor_declared_allocated_skips_the_alignment_check(direct):
    jit_fn = _JitFunction()
    kernel = CachedLaunch.allocating("x_ptr")(jit_fn)
    x = torch.randn(64)
    kernel.launch("a", bind(), x_ptr=x, eps=1e-5)
    kernel.launch("a", bind(), x_ptr=x[1:], eps=1e-5)  # taken on trust: launched directly
    assert kernel.allocated == {"x_ptr"}
    assert len(jit_fn.compiled) == 1 and len(jit_fn.kernel.launches) == 1


def test_an_absent_tensor_is_none_in_its_place_and_skips_the_alignment_check(direct):
    jit_fn = _JitFunction()
    jit_fn.params = [SimpleNamespace(name=name, is_constexpr=name.isupper())
                     for name in ("x_ptr", "r_ptr", "n", "eps", "BLOCK", "ACC")]
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    for _ in range(2):
        kernel.launch("a", bind(), x_ptr=x, r_ptr=None, eps=0.5)
    assert jit_fn.compiled[0][2]["r_ptr"] is None
    assert jit_fn.kernel.launches[0][9:] == (x, None, 100, 0.5, 64, "fp32")


def test_a_kernel_naming_its_call_arguments_first_needs_no_permutation(direct):
    jit_fn = _JitFunction()
    jit_fn.params = [SimpleNamespace(name=name, is_constexpr=name.isupper())
                     for name in ("x_ptr", "eps", "n", "BLOCK", "ACC")]
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    for _ in range(2):
        kernel.launch("a", bind(), eps=0.5, x_ptr=x)  # the call's order does not matter
    (entry,) = kernel._compiled.values()
    assert entry.in_order is None
    assert jit_fn.kernel.launches[0][9:] == (x, 0.5, 100, 64, "fp32")


def test_bind_runs_only_for_a_new_key(direct):
    jit_fn = _JitFunction()
    kernel = CachedLaunch(jit_fn)
    calls = []

    def counted():
        calls.append(1)
        return bind()()
    x = torch.randn(64)
    for _ in range(3):
        kernel.launch("a", counted, x_ptr=x, eps=1e-5)
    assert len(calls) == 1


def _specialisation(arguments):
    """What Triton specialises a launch on: each tensor's dtype or absence, each int's value
    (finer than Triton's width, divisibility by 16 and equality to 1), each float's type, each
    constexpr's value."""
    return tuple(sorted((name, value.dtype if isinstance(value, torch.Tensor) else
                         type(value) if isinstance(value, float) else value)
                        for name, value in arguments.items()))


def test_launcher_keys_separate_what_triton_specialises_on(monkeypatch):
    """Run the launchers over shapes, layouts, dtypes, flags and float arguments, recording for
    each cache key what Triton would specialise on and everything bind() gives: one key must
    never stand for two specialisations, nor for two values of an argument bound once per key
    (eps, momentum, an activation's parameter). The kernels themselves do not run (their
    outputs are left uninitialised): keys and bind() are all this checks, and leaving the
    interpreter out lets it cover every flag."""
    seen = {}

    def recording(self, cache_key, bind, **arguments):
        bound = bind()
        spec = (_specialisation(arguments), bound.constants, tuple(bound.grid))
        assert seen.setdefault((self.jit_fn, cache_key), spec) == spec

    monkeypatch.setattr(CachedLaunch, "launch", recording)
    cases = itertools.product(
        (((3, 5, 4, 2), "channels_last"), ((3, 5, 4, 2), "contiguous"),
         ((4, 5, 2, 4), "contiguous"), ((6, 5), "contiguous")),
        (torch.float16, torch.float32, torch.float64), (True, False),
        tritonbn.SUPPORTED_ACTIVATIONS, (False, True), (True, False),
        ((1e-5, 0.1, 1.0), (1e-3, 0.25, 0.5)))  # eps, momentum, a scale of the activation's
    for (shape, layout), dtype, affine, activation, residual, training, floats in cases:
        eps, momentum, scale = floats
        kwargs = {name: value * scale if isinstance(value, float) else value
                  for name, value in activation_kwargs(activation, None).items()}
        x = make_input(shape, dtype, layout, requires_grad=True)
        weight, bias, running_mean, running_var = make_params(shape[1], dtype)
        params = (weight, bias) if affine else (None, None)
        y = tritonbn.bn_act(x, running_mean, running_var, *params, training, momentum, eps,
                            activation, kwargs, torch.randn_like(x) if residual else None)
        y.backward(torch.randn_like(y))
        if training:  # SyncBatchNormAct's backward: sums and a count over every process
            r = torch.randn_like(x) if residual else None
            mean, var = kernels.batch_stats(x.detach(), None, None, momentum)
            code, param = activation_spec(activation, kwargs)
            sums, dr = kernels.grad_reduce(x.detach(), x.detach(), mean, var, *params, r, eps,
                                           code, param)
            kernels.grad_input(x.detach(), x.detach(), mean, var, *params, r, dr, sums,
                               3 * x.numel() // x.shape[1], eps, code, param)
    m = tritonbn.BatchNormAct2d(5, momentum=None, device=DEVICE)
    m(make_input((3, 5, 4, 2)))
    momentum = torch.tensor(0.1)  # as nn.BatchNorm accepts; a schedule may change it in place
    _, _, running_mean, running_var = make_params(5)
    for value in (0.1, 0.3):
        momentum.fill_(value)
        kernels.batch_stats(make_input((3, 5, 4, 2)), running_mean, running_var, momentum)
    assert len(seen) > 20


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous t one element into its storage: no longer 16-byte aligned."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buffer[1:].view(t.shape).copy_(t)


def test_what_a_kernel_declares_allocated_its_launchers_allocate(monkeypatch):
    """CachedLaunch.allocating spares tensors the per-call alignment check, so each must be
    one the launcher allocated on that call: aligned, and none of its caller's tensors (all
    misaligned here, as a view into a larger buffer can be). Every launcher runs; launches are
    only recorded."""
    seen = set()
    callers = []

    def recording(self, cache_key, bind, **arguments):
        storages = {t.untyped_storage().data_ptr() for t in callers}
        for name in self.allocated & {k for k, v in arguments.items() if v is not None}:
            tensor = arguments[name]
            assert tensor.data_ptr() % 16 == 0, (self.jit_fn.__name__, name)
            assert tensor.untyped_storage().data_ptr() not in storages, (
                self.jit_fn.__name__, name)
            seen.add((self.jit_fn.__name__, name))

    monkeypatch.setattr(CachedLaunch, "launch", recording)
    code, param = activation_spec("leaky_relu")
    for residual in (False, True):
        x, dy, r = (_misaligned(make_input((4, 3, 5))) for _ in range(3))
        r = r if residual else None
        weight, bias, running_mean, running_var = map(_misaligned, make_params(3))
        callers[:] = [t for t in (x, dy, r, weight, bias, running_mean, running_var)
                      if t is not None]
        mean, var = kernels.batch_stats(x, running_mean, running_var, 0.1)
        for statistics, training in (((mean, var), True), ((running_mean, running_var), False)):
            kernels.normalize_act(x, *statistics, weight, bias, r, 1e-5, code, param)
            kernels.normalize_act_backward(dy, x, *statistics, weight, bias, r, 1e-5, training,
                                           code, param)
        sums, dr = kernels.grad_reduce(dy, x, mean, var, weight, bias, r, 1e-5, code, param)
        callers += [sums] + ([dr] if residual else [])  # handed back by SyncBatchNormAct
        kernels.grad_input(dy, x, mean, var, weight, bias, r, dr, sums, 60, 1e-5, code, param)
    declared = {(launcher.jit_fn.__name__, name)
                for module in (kernels.forward, kernels.backward)
                for launcher in vars(module).values() if isinstance(launcher, CachedLaunch)
                for name in launcher.allocated}
    assert seen == declared


@pytest.mark.parametrize("setting, version, interpreting, hip, expected", [
    ("", "3.6.0", False, False, "on"),
    ("", "3.6.1+git0123abc", False, False, "on"),  # a patch release of a validated minor
    ("", "3.7.1", False, False, "prove"),  # torch 2.13's: never run directly on a GPU yet
    ("", "3.60.0", False, False, "prove"),
    ("", "4.0.0", False, False, "prove"),
    ("0", "3.6.0", False, False, "off"),
    ("1", "3.9.0", False, False, "on"),  # how a GPU run validates a new version
    ("1", "3.9.0", True, False, "off"),  # the interpreter has no compiled kernels to launch
    ("1", "3.6.0", False, True, "off"),  # AMD specialises on more than the cache keys hold
])
def test_direct_launches_trusted_only_where_validated(setting, version, interpreting, hip,
                                                      expected):
    mode, why = launch.direct_launches(setting, version, interpreting, hip)
    assert mode == expected and why


def test_a_bad_switch_value_is_an_error():
    with pytest.raises(ValueError, match="TRITONBN_DIRECT_LAUNCH must be 0, 1 or unset"):
        launch.direct_launches("yes", "3.6.0", False, False)


def _fresh_launch_module(monkeypatch, triton_version, setting=None):
    """launch.py imported anew, as on a GPU machine with this Triton version and switch."""
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(tritonbn.kernels, "INTERPRETING", False)
    if setting is None:
        monkeypatch.delenv("TRITONBN_DIRECT_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("TRITONBN_DIRECT_LAUNCH", setting)
    spec = importlib.util.spec_from_file_location("tritonbn.kernels.fresh_launch",
                                                  launch.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("triton_version, setting, through_triton, direct", [
    ("3.6.0", None, 1, 2), ("3.6.0", "0", 3, 0), ("3.9.0", "1", 1, 2),
    # compiled; proved (each path on copies) and launched through Triton; direct
    ("3.9.0", None, 3, 2)])
def test_the_switch_and_the_version_decide_at_import(monkeypatch, triton_version, setting,
                                                     through_triton, direct):
    fresh = _fresh_launch_module(monkeypatch, triton_version, setting)
    assert fresh.LAUNCH_DIRECTLY is (direct > 0)
    stand_in = SimpleNamespace(get_current_device=lambda: 0,
                               get_current_stream=lambda device: 1234)
    monkeypatch.setattr(fresh, "driver", SimpleNamespace(active=stand_in))
    jit_fn = _JitFunction()
    kernel = fresh.CachedLaunch(jit_fn)
    for _ in range(3):
        kernel.launch("a", bind(), x_ptr=torch.randn(64), eps=1e-5)
    assert len(jit_fn.compiled) == through_triton
    assert len(jit_fn.kernel.launches) == direct


def _launch_recording_warnings(kernel, calls, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            kernel.launch("a", bind(), x_ptr=x, eps=1e-5)
    return [w for w in caught if issubclass(w.category, DirectLaunchFallbackWarning)]


def test_a_direct_launch_that_raises_falls_back_with_one_warning(direct):
    jit_fn = _JitFunction(_RaisingKernel())
    kernel = CachedLaunch(jit_fn)
    x = torch.randn(64)
    caught = _launch_recording_warnings(kernel, 4, x)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "stand_in_kernel" in message and "15 positional arguments" in message
    assert triton.__version__ in message and "TRITONBN_DIRECT_LAUNCH=0" in message
    # The first call compiled; the second failed directly and went through Triton, as did
    # every later one: each call launched exactly once.
    assert len(jit_fn.compiled) == 4
    # Another kernel keeps its direct path, and would warn for itself.
    working = _JitFunction()
    other = CachedLaunch(working)
    assert not _launch_recording_warnings(other, 3, x)
    assert len(working.compiled) == 1 and len(working.kernel.launches) == 2
    broken_too = CachedLaunch(_JitFunction(_RaisingKernel()))
    assert len(_launch_recording_warnings(broken_too, 3, x)) == 1


def test_a_compiled_kernel_that_cannot_be_read_falls_back(direct):
    """A Triton whose JIT functions no longer list their params: the compiling call launched
    once through Triton, then warns, and every later call takes Triton's path."""
    jit_fn = _JitFunction()
    jit_fn.params = None
    kernel = CachedLaunch(jit_fn)
    caught = _launch_recording_warnings(kernel, 3, torch.randn(64))
    assert len(caught) == 1 and "TypeError" in str(caught[0].message)
    assert len(jit_fn.compiled) == 3 and not jit_fn.kernel.launches


class _AccumulatingKernel(_CompiledKernel):
    """Adds 2 x + n + eps into out, as the stand-in JIT function's Triton path does; `wrong`
    leaves n out, as a launcher handed its arguments in another order might."""

    def __init__(self, wrong=False):
        super().__init__()
        self.wrong = wrong

    def run(self, *args):
        super().run(*args)
        x, out, n, eps = args[9:13]
        out.add_(2 * x + (0 if self.wrong else n) + eps)


class _AccumulatingJit(_JitFunction):
    params = [SimpleNamespace(name=name, is_constexpr=name.isupper())
              for name in ("x_ptr", "out_ptr", "n", "eps", "BLOCK", "ACC")]

    def __getitem__(self, grid):
        def compile_and_launch(*, x_ptr, out_ptr, n, eps, **constexprs):
            x, out = x_ptr, out_ptr
            self.compiled.append((x, out))
            out.add_(2 * x + n + eps)
            return self.kernel
        return compile_and_launch


def _accumulate(kernel, x, out, calls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            kernel.launch("a", bind(), x_ptr=x, out_ptr=out, eps=0.5)
    return [w for w in caught if issubclass(w.category, DirectLaunchFallbackWarning)]


def test_a_variant_proves_itself_on_copies_then_launches_directly(proving):
    jit_fn = _AccumulatingJit(_AccumulatingKernel())
    kernel = CachedLaunch(jit_fn)
    x, out = torch.randn(64), torch.zeros(64)
    x_before = x.clone()
    assert not _accumulate(kernel, x, out, 2)
    # The first call compiled; the second launched each path on copies of (x, out), then
    # itself through Triton.
    (x0, out0), (x1, out1), (x2, out2) = jit_fn.compiled
    assert x0 is x and out0 is out and x2 is x and out2 is out
    assert x1 is not x and out1 is not out and torch.equal(x1, x)
    assert len(jit_fn.kernel.launches) == 1 and jit_fn.kernel.launches[0][9] is not x
    assert kernel.proven == 1
    assert not _accumulate(kernel, x, out, 2)  # direct now, with no further proof
    assert len(jit_fn.compiled) == 3 and len(jit_fn.kernel.launches) == 3
    # The caller's tensors saw exactly one launch per call; x is only read.
    torch.testing.assert_close(out, 4 * (2 * x + 100 + 0.5))
    assert torch.equal(x, x_before)


def test_a_variant_that_fails_its_proof_stays_on_tritons_path(proving):
    jit_fn = _AccumulatingJit(_AccumulatingKernel(wrong=True))
    kernel = CachedLaunch(jit_fn)
    x, out = torch.randn(64), torch.zeros(64)
    caught = _accumulate(kernel, x, out, 4)
    assert len(caught) == 1 and "differ from Triton's launch" in str(caught[0].message)
    assert kernel.proven == 0 and len(jit_fn.kernel.launches) == 1  # on the copies only
    torch.testing.assert_close(out, 4 * (2 * x + 100 + 0.5))
    assert "on Triton's own path after a failure: stand_in_kernel" in \
        launch.direct_launch_state()


def test_a_proof_waits_for_a_call_small_enough_to_copy(proving, monkeypatch):
    jit_fn = _AccumulatingJit(_AccumulatingKernel())
    kernel = CachedLaunch(jit_fn)
    x, out = torch.randn(64), torch.zeros(64)
    monkeypatch.setattr(launch, "PROOF_MAX_BYTES", 2 * 64 * 4 - 1)
    _accumulate(kernel, x, out, 3)
    assert len(jit_fn.compiled) == 3 and not jit_fn.kernel.launches and kernel.proven == 0
    monkeypatch.setattr(launch, "PROOF_MAX_BYTES", 2 * 64 * 4)
    # A tensor passed twice is copied once.
    assert CachedLaunch._provable(dict(x_ptr=x, out_ptr=out, again_ptr=x))
    _accumulate(kernel, x, out, 2)
    assert kernel.proven == 1 and len(jit_fn.kernel.launches) == 2
    torch.testing.assert_close(out, 5 * (2 * x + 100 + 0.5))


def test_a_proof_that_runs_out_of_memory_waits_for_another_call(proving, monkeypatch):
    jit_fn = _AccumulatingJit(_AccumulatingKernel())
    kernel = CachedLaunch(jit_fn)
    x, out = torch.randn(64), torch.zeros(64)
    copies = launch._copies

    def out_of_memory(arguments):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(launch, "_copies", out_of_memory)
    assert not _accumulate(kernel, x, out, 3)
    assert kernel.proven == 0 and not jit_fn.kernel.launches
    monkeypatch.setattr(launch, "_copies", copies)
    _accumulate(kernel, x, out, 2)
    assert kernel.proven == 1 and len(jit_fn.kernel.launches) == 2
    torch.testing.assert_close(out, 5 * (2 * x + 100 + 0.5))


def test_copies_alias_as_the_originals_and_compare_bit_for_bit():
    x = torch.randn(4, 6).t()  # not contiguous: copies keep the strides
    x[0, 0] = float("nan")
    copies = launch._copies(dict(a=x, b=x, c=torch.zeros(3), eps=0.5, r=None))
    assert copies["eps"] == 0.5 and copies["r"] is None
    a, b, c = copies["a"], copies["b"], copies["c"]
    assert a is b and a.stride() == x.stride() and a.data_ptr() != x.data_ptr()
    assert launch._same_bits(a, x)  # NaN in the same place
    a[1, 1] = -0.0 if x[1, 1] == 0 else 0.0
    c.fill_(-0.0)
    assert not launch._same_bits(a, x) and not launch._same_bits(c, torch.zeros(3))


def _bn_act_results(x, residual, dy, params, activation, training):
    """Output, gradients and running statistics of one bn_act forward and backward, on copies
    of params = (weight or None, bias or None, running_mean, running_var)."""
    weight, bias, running_mean, running_var = (None if p is None else p.clone() for p in params)
    residual = None if residual is None else residual.clone()
    leaves = [t.requires_grad_() for t in (x.clone(), weight, bias, residual) if t is not None]
    y = tritonbn.bn_act(leaves[0], running_mean, running_var, weight, bias, training,
                        activation=activation, residual=residual)
    return (y, *torch.autograd.grad(y, leaves, dy), running_mean, running_var)


@gpu_only
def test_direct_launches_match_tritons_own_path(monkeypatch):
    """What validating a Triton version means: the direct path launches the real kernels with
    exactly the results of Triton's own path, and without falling back. Runs on any version
    (as TRITONBN_DIRECT_LAUNCH=1 would)."""
    through_triton = []
    original = CachedLaunch._through_triton

    def counted(self, *args):
        through_triton.append(self)
        return original(self, *args)

    monkeypatch.setattr(CachedLaunch, "_through_triton", counted)
    cases = itertools.product(
        (((6, 5, 7, 3), "channels_last"), ((7, 3, 5), "contiguous"),
         ((3, 4, 3, 5, 2), "channels_last"), ((33, 70), "contiguous")),
        (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        tritonbn.SUPPORTED_ACTIVATIONS, (True, False), (True, False), (False, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DirectLaunchFallbackWarning)
        for (shape, layout), dtype, activation, training, affine, residual in cases:
            x = make_input(shape, dtype, layout)
            dy = torch.randn_like(x)
            weight, bias, running_mean, running_var = make_params(shape[1], dtype)
            params = (weight, bias) if affine else (None, None)
            args = (x, torch.randn_like(x) if residual else None, dy,
                    params + (running_mean, running_var), activation, training)
            monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", False)
            expected = _bn_act_results(*args)
            monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", True)
            monkeypatch.setattr(launch, "PROVE_LAUNCHES", False)
            _bn_act_results(*args)  # compiles, or finds it compiled
            through_triton.clear()
            got = _bn_act_results(*args)
            assert not through_triton, "a cached call took Triton's path"
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b), (shape, dtype, activation, training, affine, residual)


@gpu_only
def test_proofs_pass_on_the_real_kernels(monkeypatch):
    """On this GPU's Triton, as on a version not validated: every kernel variant's proof
    passes, and the calls after it launch directly with Triton's path's results."""
    cases = itertools.product((((6, 5, 7, 3), "channels_last"), ((33, 70), "contiguous")),
                              (torch.bfloat16, torch.float32), ("relu", "silu"), (True, False))
    monkeypatch.setattr(launch, "PROVE_LAUNCHES", True)
    for launcher in launch.LAUNCHERS:  # no variant trusted from earlier tests
        monkeypatch.setattr(launcher, "_compiled", {})
        monkeypatch.setattr(launcher, "_unproven", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DirectLaunchFallbackWarning)
        for (shape, layout), dtype, activation, training in cases:
            x = make_input(shape, dtype, layout)
            args = (x, torch.randn_like(x), torch.randn_like(x), make_params(shape[1], dtype),
                    activation, training)
            monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", False)
            expected = _bn_act_results(*args)
            monkeypatch.setattr(launch, "LAUNCH_DIRECTLY", True)
            proven = sum(launcher.proven for launcher in launch.LAUNCHERS)
            for _ in range(3):  # compile, prove, launch directly
                got = _bn_act_results(*args)
            assert sum(launcher.proven for launcher in launch.LAUNCHERS) > proven
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b), (shape, dtype, activation, training)
