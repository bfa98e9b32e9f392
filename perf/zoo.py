"""The model-zoo table: what tritonbn.fuse_bn_act converts in torchvision's and timm's CNNs,
why it leaves the rest alone, and whether the converted model computes the same function.

Each model is built with random weights (nothing is downloaded) in channels_last, and converted.
Counted: the BatchNorm modules, those converted (fused), those of them that apply an activation
and those that add a residual, and the reasons of the rest. Checked, unless --counts-only: one
training step, then one eval step, on a random batch, of the model and the converted model in
float32 and in float64: their outputs, input and parameter gradients and running statistics.

- out_diff, grad_diff, stats_diff: the largest absolute differences of the converted model
  from the unconverted one, in float32;
- ratio_fp32: the largest, over all those tensors, of the converted float32 model's error
  against the unconverted float64 model, divided by eager float32's own error (floored at one
  float32 rounding of the largest value of the tensor and of its module's other gradients: a
  gradient that cancels to zero still carries the roundings of its terms). A pre-activation
  within rounding of a kink (ReLU's 0) can land on either side in float32, and the gradient it
  routes then differs by that element's whole gradient: a value above 2 says such a flip
  happened, where eager's own run had none.
- ratio_fp64: the same for the converted model run in float64, where no value lands that close
  to a kink: the check that the conversion computes the same function. At most 2 passes.

Dropout, stochastic depth and drop-path modules run in eval mode during the check, in every
model, so that all compute the same function; the conversion sees them as they are.

The BatchNorms run where tritonbn runs them: the Triton kernels on a GPU, through Triton's
interpreter on CPU tensors when TRITON_INTERPRET=1 is set (slow: minutes per model), PyTorch's
reference otherwise (the backend column says which). Writes a CSV (one row per model and mode;
perf/results/zoo.csv on a GPU, perf/zoo_cpu.csv without one, since perf/results/ holds GPU
runs only) and prints a markdown table. A model whose package (torchvision, timm) cannot be
imported stops the run with a message and exit status 2, before anything is written; a CSV is
never replaced by one with fewer rows (--append adds to it, --out writes elsewhere).

--all runs the sweep instead: every torchvision classification, segmentation, video and
detection model that holds a BatchNorm, and the smallest model of each timm family listed in
perf/zoo_timm_families.txt, built in float64 and run on PyTorch's reference path, at 64x64
(or the first size the model runs at: its published minimum, then its native size), batch 2
(at 32x32 the last stage of most models normalizes 2 values per channel in training, where
the input gradient is zero but for rounding, which the deeper layers amplify past 1e16).
Each is converted once in training and once in eval mode, and each conversion is run in
training and in eval mode (one forward and backward, random ops seeded alike) against the
unconverted model: worst_error is the largest error over outputs, input and parameter
gradients and buffers, relative to the model's largest gradient for a gradient and to the
largest buffer of its module for a buffer (some are zero but for rounding), to its own largest
value for an output; exact means at most 1e-9. Writes perf/zoo_all_cpu.csv (rows also go to
zoo_all_cpu.csv.partial as they come) with the fused share, the leaves and the reasons, shows
a progress bar, and exits 1 if a model is not exact.

    python perf/zoo.py --counts-only
    TRITON_INTERPRET=1 python perf/zoo.py --models timm/regnety_008 --append
    python perf/zoo.py --models torchvision/resnet18,timm/efficientnet_b0 --image-size 32
    python perf/zoo.py --all
"""
import argparse
import collections
import copy
import csv
import importlib
import inspect
import io
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from torch import nn

import tritonbn
from tritonbn import dispatch

MODELS = ("torchvision/resnet18", "torchvision/resnet50", "torchvision/resnext50_32x4d",
          "torchvision/regnet_y_400mf", "torchvision/mobilenet_v2",
          "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0",
          "torchvision/densenet121", "timm/resnet50", "timm/efficientnet_b0",
          "timm/mobilenetv3_large_100", "timm/cspdarknet53", "timm/regnety_008")
# Random modules, by class name: in eval mode during the check.
STOCHASTIC = ("Dropout", "StochasticDepth", "DropPath", "DropBlock2d")
COUNT_COLUMNS = ["model", "batchnorms", "fused", "with_activation", "with_residual",
                 "left_alone"]
CHECK_COLUMNS = ["mode", "out_diff", "grad_diff", "stats_diff", "ratio_fp32", "ratio_fp64"]
RUN_COLUMNS = ["image_size", "batch", "backend", "device", "seconds", "torch", "triton", "date"]
DEFAULT_OUT = Path(__file__).resolve().parent / (
    "results/zoo.csv" if torch.cuda.is_available() else "zoo_cpu.csv")


class MissingPackage(Exception):
    """A package a model needs (torchvision, timm) cannot be imported."""


def build(model_name: str, **kwargs) -> nn.Module:
    """torchvision/<name> or timm/<name>, with random weights."""
    source, name = model_name.split("/")
    if source not in ("torchvision", "timm"):
        raise ValueError(f"unknown model source {source!r} in {model_name!r}")
    try:
        package = importlib.import_module("torchvision.models" if source == "torchvision"
                                          else "timm")
    except Exception as error:  # torchvision's C++ ops fail to load on a mismatched torch
        raise MissingPackage(f"{model_name} needs {source}, which cannot be imported "
                             f"({type(error).__name__}: {error})") from error
    if source == "timm":
        return package.create_model(name, pretrained=False, **kwargs)
    if "weights_backbone" in inspect.signature(package.get_model_builder(name)).parameters:
        kwargs = dict(weights_backbone=None, **kwargs)  # detection, segmentation: no download
    return package.get_model(name, weights=None, **kwargs)


def census(model: nn.Module, converted: nn.Module) -> dict:
    """The counts of the table, and the reasons for what was left alone, each with its count."""
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    pairs = converted.fused_pairs
    reasons = collections.Counter(reason.split(": ")[0]  # "inside a leaf: <its path>"
                                  for reason in converted.left_alone.values())
    fused = len({pair.bn for pair in pairs})
    return dict(batchnorms=batchnorms, fused=fused, fused_share=round(fused / batchnorms, 3),
                with_activation=len({pair.bn for pair in pairs if pair.activation}),
                with_residual=len({pair.bn for pair in pairs if pair.residual}),
                left_alone="; ".join(f"{count} {reason}" for reason, count in reasons.items()))


def set_mode(model: nn.Module, training: bool) -> None:
    model.train(training)
    for module in model.modules():
        if type(module).__name__ in STOCHASTIC:
            module.eval()


def step(model: nn.Module, x: torch.Tensor, grad=None) -> tuple[dict, torch.Tensor]:
    """Forward and backward of grad (random if None): ({name: tensor} of the output, the
    input's gradient, every parameter's gradient and every buffer after the step, detached, in
    float64; grad)."""
    x = x.clone().requires_grad_()
    y = model(x)
    grad = torch.randn_like(y) if grad is None else grad.to(y.dtype)
    y.backward(grad)
    tensors = {"output": y, "input.grad": x.grad}
    tensors.update((f"{name}.grad", p.grad) for name, p in model.named_parameters())
    tensors.update((name, b) for name, b in model.named_buffers())
    model.zero_grad(set_to_none=True)
    return {name: t.detach().double() for name, t in tensors.items() if t is not None}, grad


def compare(converted: dict, eager: dict, converted64: dict, exact: dict) -> dict:
    """The largest differences of converted from eager (output, gradients, buffers), and the
    worst ratios of converted's and converted64's errors against exact to eager's own.

    Eager's own error is floored at one float32 rounding of the largest value among the
    tensor and its module's other gradients: a gradient can be zero by cancellation (the
    bias gradient of a BatchNorm whose output reaches another training BatchNorm through a
    1x1 conv alone), and its rounding then scales with its terms, not with its value."""
    scale = collections.defaultdict(float)
    for name, reference in exact.items():
        scale[_module_of(name)] = max(scale[_module_of(name)], reference.abs().max().item())
    row = collections.defaultdict(float)
    for name, reference in exact.items():
        kind = ("out_diff" if name == "output" else "grad_diff" if name.endswith(".grad")
                else "stats_diff")
        row[kind] = max(row[kind], (converted[name] - eager[name]).abs().max().item())
        own = max((eager[name] - reference).abs().max().item(),
                  scale[_module_of(name)] * torch.finfo(torch.float32).eps / 2)
        for column, candidate in (("ratio_fp32", converted), ("ratio_fp64", converted64)):
            error = (candidate[name] - reference).abs().max().item()
            row[column] = max(row[column], error / own if error else 0.0)
    return dict(row)


def _module_of(name: str) -> str:
    """"blocks.5.0.bn3" for "blocks.5.0.bn3.bias.grad"; a buffer or the output stands alone."""
    return name.rsplit(".", 2)[0] if name.endswith(".grad") and name.count(".") > 1 else name


def check(model: nn.Module, converted: nn.Module, image_size: int, batch: int) -> list[dict]:
    """A training step, then an eval step, on the four models: [row of each mode]."""
    runs = ((converted, torch.float32), (model, torch.float32),
            (copy.deepcopy(converted).double(), torch.float64),
            (copy.deepcopy(model).double(), torch.float64))
    rows = []
    for training in (True, False):
        x = torch.randn(batch, 3, image_size, image_size).contiguous(
            memory_format=torch.channels_last)
        grad = None
        results = []
        for candidate, dtype in runs:
            set_mode(candidate, training)
            tensors, grad = step(candidate, x.to(dtype), grad)
            results.append(tensors)
        rows.append(dict(mode="train" if training else "eval", **compare(*results)))
    return rows


def run(model_name: str, image_size: int, batch: int, counts_only: bool, seed: int) -> list:
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = build(model_name).to(memory_format=torch.channels_last)
    converted = tritonbn.fuse_bn_act(model)
    counts = dict(model=model_name, **census(model, converted))
    checks = [{}] if counts_only else check(model, converted, image_size, batch)
    probe = torch.empty(1)
    backend = (("triton-interpreter" if probe.device.type == "cpu" else "triton")
               if dispatch.runs_triton(probe) else "reference")
    common = dict(image_size=image_size, batch=batch, backend=backend, device=probe.device.type,
                  seconds=round(time.perf_counter() - start, 1), torch=torch.__version__,
                  triton=_triton_version(), date=date.today().isoformat())
    return [dict(counts, **row, **common) for row in checks]


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.1e}" if isinstance(value, float) and value < 0.01 else (
            f"{value:.2f}" if isinstance(value, float) else str(value))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --all: every torchvision model with BatchNorm, and the smallest of each timm family's.
TORCHVISION_KINDS = ("", "segmentation", "video", "detection")
TIMM_FAMILIES = Path(__file__).resolve().parent / "zoo_timm_families.txt"
SWEEP_COLUMNS = ["model", "batchnorms", "fused", "fused_share", "leaves", "worst_error", "exact",
                 "hooks", "pickles", "left_alone", "leaf_reasons", "error", "image_size",
                 "seconds"]
SWEEP_COUNT_COLUMNS = ["model", "batchnorms", "fused", "fused_share", "with_activation",
                       "with_residual", "leaves", "left_alone", "leaf_reasons", "error"]
SWEEP_OUT = Path(__file__).resolve().parent / "zoo_all_cpu.csv"
# Relative error, over outputs, gradients and buffers, within which the converted float64
# model computes the same function (fused and unfused BatchNorms round differently).
EXACT = 1e-9


def _torchvision_kind(name: str) -> str:
    import torchvision.models
    for kind in TORCHVISION_KINDS:
        module = getattr(torchvision.models, kind) if kind else torchvision.models
        if name in torchvision.models.list_models(module=module):
            return kind
    return ""


def all_models() -> list[str]:
    """The --all list: torchvision's classification, segmentation, video and detection models
    that hold a BatchNorm, then timm's families (perf/zoo_timm_families.txt)."""
    import torchvision.models
    names = []
    for kind in TORCHVISION_KINDS:
        module = getattr(torchvision.models, kind) if kind else torchvision.models
        for name in torchvision.models.list_models(module=module):
            model = _meta_build(f"torchvision/{name}")
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                names.append(f"torchvision/{name}")
    return names + [f"timm/{line.split()[0]}" for line in TIMM_FAMILIES.read_text().splitlines()
                    if line and not line.startswith("#")]


# Frames per video clip: s3d's temporal pooling needs more than 4.
VIDEO_FRAMES = {"torchvision/s3d": 16}


def _inputs(model_name: str, image_size: int, batch: int) -> tuple:
    """(args, training-only kwargs) of one float64 call; detection models take a list of
    images, and targets in training."""
    kind = _torchvision_kind(model_name.split("/")[1]) if "torchvision/" in model_name else ""
    if kind == "video":
        frames = VIDEO_FRAMES.get(model_name, 4)
        return (torch.randn(batch, 3, frames, image_size, image_size, dtype=torch.float64),), {}
    images = torch.randn(batch, 3, image_size, image_size, dtype=torch.float64)
    if kind != "detection":
        return (images,), {}
    corners = torch.rand(batch, 2, 2, dtype=torch.float64) * image_size / 2
    targets = [{"boxes": torch.cat([c[0], c[0] + c[1] + 1]).reshape(1, 4), "labels":
                torch.ones(1, dtype=torch.int64), "masks": torch.ones(
                    1, image_size, image_size, dtype=torch.uint8),
                # float32 whatever the model's dtype: torchvision's check asks for it.
                "keypoints": torch.ones(1, 17, 3)} for c in corners]
    return (list(images),), {"targets": targets}


def _tensors(value, key="output") -> list:
    """(key, tensor) of every tensor in a nested output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [(key, value)]
    if isinstance(value, dict):
        items = sorted(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    elif hasattr(value, "__dict__"):  # torchvision's ImageList, say: its tensors
        items = sorted(vars(value).items())
    else:
        return [(f"{key}:{type(value).__name__}", torch.tensor(float(hash(value) % 997)))]
    return [pair for name, item in items for pair in _tensors(item, f"{key}.{name}")]


def sweep_step(model: nn.Module, args: tuple, train_kwargs: dict, training: bool,
               seed: int) -> dict:
    """One forward and backward in a mode, random ops seeded: {name: tensor} of the outputs,
    input and parameter gradients and buffers after the step."""
    model.train(training)
    args = tuple([t.clone().requires_grad_() for t in a] if isinstance(a, list)
                 else a.clone().requires_grad_() for a in args)
    torch.manual_seed(seed)
    outputs = _tensors(model(*args, **(train_kwargs if training else {})))
    generator = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
               for _, t in outputs if t.requires_grad)
    if torch.is_tensor(loss):
        loss.backward()
    inputs = [t for a in args for t in (a if isinstance(a, list) else [a])]
    tensors = dict(outputs)
    tensors.update((f"input{i}.grad", t.grad) for i, t in enumerate(inputs))
    tensors.update((f"{name}.grad", p.grad) for name, p in model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: t.detach() for name, t in tensors.items() if t is not None}


def _worst_error(result: dict, reference: dict) -> float:
    """Largest error over the tensors, relative to the largest gradient of the model for a
    gradient, to the largest of its module's buffers for a buffer (a running mean can be zero
    but for rounding), and to its own largest value otherwise; inf where names or shapes
    differ. A gradient can be zero but for rounding: through a training
    BatchNorm over 2 values (batch 2, 1x1) it is, exactly, and a bias gradient in front of a
    training BatchNorm cancels; its rounding scales with the gradients it is made of."""
    if result.keys() != reference.keys() or any(
            result[name].shape != expected.shape for name, expected in reference.items()):
        return float("inf")
    scale = collections.defaultdict(lambda: 1e-300)
    for name, expected in reference.items():
        if expected.numel():
            key = _scale_group(name)
            scale[key] = max(scale[key], expected.double().abs().max().item())
    worst = 0.0
    for name, expected in reference.items():
        if expected.numel():
            error = (result[name].double() - expected.double()).abs().max().item()
            worst = max(worst, error / scale[_scale_group(name)] if error == error
                        else float("inf"))
    return worst


def _scale_group(name: str) -> str:
    """"grad" for a gradient, the module's path for a buffer, the tensor's name otherwise."""
    return "grad" if name.endswith(".grad") else name.rpartition(".")[0] or name


def sweep(model_name: str, image_size: int, batch: int, seed: int) -> dict:
    """The --all row of one model: converted in training and in eval mode, each run in
    training and in eval mode against the unconverted model, in float64 on PyTorch's
    reference path; the counts are of the conversion in training mode."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    detection = "torchvision/" in model_name and _torchvision_kind(model_name[12:]) == "detection"
    sizes = dict(min_size=image_size, max_size=image_size)  # it resizes to 800 by default
    model = build(model_name, **(sizes if detection and "ssd" not in model_name else {}))
    model = model.double()
    args, train_kwargs = _inputs(model_name, image_size, batch)
    expected = {training: sweep_step(copy.deepcopy(model), args, train_kwargs, training, seed)
                for training in (True, False)}
    row, worst, pickles = {}, 0.0, True
    for converted_in in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = tritonbn.fuse_bn_act(copy.deepcopy(model).train(converted_in))
        if converted_in:
            row = census(model, converted)
        for training in (True, False):
            loaded = saved_and_loaded(converted)  # runs the copy torch.save wrote
            pickles &= _report(loaded) == _report(converted)
            result = sweep_step(loaded, args, train_kwargs, training, seed)
            worst = max(worst, _worst_error(result, expected[training]))
    hooks = hook_mismatch(model, converted, args, seed) or "same"
    return dict(model=model_name, **row, **_leaf_counts(converted),
                worst_error=worst, exact=worst <= EXACT, hooks=hooks, pickles=pickles,
                image_size=image_size, seconds=round(time.perf_counter() - start, 1))


def _leaf_counts(converted: nn.Module) -> dict:
    reasons = collections.Counter(reason.split(": ")[0] for reason in converted.leaves.values())
    return dict(leaves=len(converted.leaves), leaf_reasons=_tally(reasons))


def sweep_counts(model_name: str) -> dict:
    """The --all --counts-only row of one model: converted in training mode, not run (built
    without memory for its weights where its builder allows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _meta_build(model_name)
        converted = tritonbn.fuse_bn_act(model)
    return dict(model=model_name, **census(model, converted), **_leaf_counts(converted))


def saved_and_loaded(model: nn.Module) -> nn.Module:
    """What torch.load(weights_only=False) gives back of torch.save(model)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _report(converted: nn.Module) -> tuple:
    return converted.fused_pairs, converted.left_alone, converted.leaves


def hook_mismatch(model: nn.Module, converted: nn.Module, args: tuple, seed: int) -> str:
    """"" when, in one eval forward, forward hooks on every module of the original fire on the
    converted model as often and with the same outputs; else the first module that differs.
    Aside: the fused BatchNorms (their output is now the activated one), and the activation
    and no-op modules whose calls moved into them, which may be called less or not at all."""
    fused = {pair.bn for pair in converted.fused_pairs}
    absorbable = {pair.activation for pair in converted.fused_pairs}
    present = dict(converted.named_modules())
    paths = [path for path, module in model.named_modules()
             if path and path not in fused and path in present]
    expected = _hooked_outputs(model, paths, args, seed)
    got = _hooked_outputs(converted, paths, args, seed)
    for path in paths:
        if len(got[path]) != len(expected[path]):
            if len(got[path]) < len(expected[path]) and (
                    path in absorbable or not any(True for _ in present[path].parameters())
                    and type(present[path]) in (nn.Identity, nn.Dropout)
                    or type(present[path]).__name__ in STOCHASTIC):
                continue
            return f"{path}: {len(got[path])} calls, not {len(expected[path])}"
        for ours, theirs in zip(got[path], expected[path]):
            if _worst_error(dict(ours), dict(theirs)) > EXACT:
                return f"{path}: another output"
    return ""


def _hooked_outputs(model: nn.Module, paths: list, args: tuple, seed: int) -> dict:
    """{path: [[(name, tensor) of each call's output]]} of one eval forward, on a copy."""
    model = copy.deepcopy(model).eval()
    calls = {path: [] for path in paths}
    for path in paths:
        model.get_submodule(path).register_forward_hook(
            lambda module, inputs, output, path=path: calls[path].append(
                [(name, t.detach().clone()) for name, t in _tensors(output)]))
    torch.manual_seed(seed)
    with torch.no_grad():
        model(*args)
    return calls


def _tally(reasons: collections.Counter) -> str:
    return "; ".join(f"{count} {reason}" for reason, count in reasons.most_common())


# The sweep holds several float64 copies of a model and their gradients: past this many
# parameters (regnet_y_128gf's 644M) that exceeds a 24 GB machine, so such rows say "not run".
MAX_PARAMETERS = 200_000_000


def _meta_build(model_name: str) -> nn.Module:
    """The model without memory for its weights, where its builder allows that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return build(model_name)
        except NotImplementedError:
            return build(model_name)


def parameter_count(model_name: str) -> int:
    return sum(p.numel() for p in _meta_build(model_name).parameters())


def _sweep_with_sizes(model_name: str, image_size: int, batch: int, seed: int) -> dict:
    """sweep() at image_size, or at the first of the model's own input sizes it runs at."""
    parameters = parameter_count(model_name)
    if parameters > MAX_PARAMETERS:
        return dict(model=model_name, image_size=image_size,
                    error=f"not run: {parameters / 1e6:.0f}M parameters, over the sweep's "
                          f"{MAX_PARAMETERS / 1e6:.0f}M (its float64 copies would not fit in "
                          f"memory)")
    for size in [image_size, *(s for s in _native_sizes(model_name) if s > image_size)]:
        try:
            return sweep(model_name, size, batch, seed)
        except MissingPackage:
            raise
        except Exception as error:  # models run arbitrary code: the row says what failed
            failure = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    return dict(model=model_name, error=failure, image_size=size)


def _native_sizes(model_name: str) -> list[int]:
    """The smallest input size a model's published weights allow, and the one they use."""
    source, name = model_name.split("/")
    try:
        if source == "timm":
            import timm
            return [timm.get_pretrained_cfg(name).input_size[-1]]
        import torchvision.models
        weights = torchvision.models.get_model_weights(name).DEFAULT
        return [weights.meta.get("min_size", (0, 0))[-1], weights.transforms().crop_size[-1]]
    except Exception:  # models without published weights or configuration
        return [224]


def write_rows(path: Path, columns: list[str], rows: list[dict], append: bool) -> None:
    """Write (or append) rows as CSV; never replace a file that holds more rows."""
    existing = []
    if path.exists():
        with open(path, newline="") as file:
            existing = list(csv.DictReader(file))
    if existing and not append and len(rows) < len(existing):
        raise SystemExit(f"refusing to replace {path} ({len(existing)} rows) with "
                         f"{len(rows)} rows: pass --out for another file, or --append")
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not (append and existing)
    with open(path, "w" if new_file else "a", newline="") as file:
        writer = csv.DictWriter(file, columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated torchvision/<name> or timm/<name>")
    parser.add_argument("--all", action="store_true",
                        help="the float64 sweep in both modes over every model of the zoo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--counts-only", action="store_true", help="convert and count only")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write")
    parser.add_argument("--append", action="store_true", help="add the rows to --out")
    args = parser.parse_args(argv)
    try:
        if args.all:
            return _main_all(args)
        return _main_table(args)
    except MissingPackage as error:
        print(f"error: {error}; nothing written", file=sys.stderr)
        return 2


def _main_table(args) -> int:
    rows = []
    for model_name in (args.models or ",".join(MODELS)).split(","):
        rows += run(model_name, args.image_size, args.batch, args.counts_only, args.seed)
        print(markdown(rows[-1:], COUNT_COLUMNS + CHECK_COLUMNS), flush=True)
    columns = COUNT_COLUMNS + ([] if args.counts_only else CHECK_COLUMNS) + RUN_COLUMNS
    write_rows(args.out or DEFAULT_OUT, columns, rows, args.append)
    print(markdown(rows, columns[:-len(RUN_COLUMNS)] + ["backend", "seconds"]))
    print(f"wrote {len(rows)} rows to {args.out or DEFAULT_OUT}")
    return 0


def _main_all(args) -> int:
    """The sweep: rows go to <out>.partial as they come, which replaces out at the end."""
    from tqdm import tqdm
    dispatch.INTERPRETING = False  # PyTorch's reference path: the sweep checks the rewrite
    names = args.models.split(",") if args.models else all_models()
    if args.counts_only:
        return _main_all_counts(args, names)
    out = args.out or SWEEP_OUT
    partial = out.with_suffix(out.suffix + ".partial")
    partial.unlink(missing_ok=True)
    rows = []
    with tqdm(names, unit="model", file=sys.stderr) as progress:
        for model_name in progress:
            progress.set_postfix_str(model_name)
            rows.append(_sweep_with_sizes(model_name, args.image_size, args.batch, args.seed))
            write_rows(partial, SWEEP_COLUMNS, rows[-1:], append=True)
            print(markdown(rows[-1:], SWEEP_COLUMNS), flush=True)
    write_rows(out, SWEEP_COLUMNS, rows, args.append)
    partial.unlink()
    print(summary(rows))
    return 0 if all(row.get("exact", True) and row.get("hooks", "same") == "same"
                    and row.get("pickles", True) for row in rows) else 1


def _main_all_counts(args, names: list) -> int:
    """--all --counts-only: each model converted, not run; writes --out or prints."""
    from tqdm import tqdm
    rows = []
    for model_name in tqdm(names, unit="model", file=sys.stderr):
        try:
            rows.append(sweep_counts(model_name))
        except MissingPackage:
            raise
        except Exception as error:  # models run arbitrary code: the row says what failed
            rows.append(dict(model=model_name,
                             error=f"{type(error).__name__}: {error}".splitlines()[0][:200]))
    if args.out:
        write_rows(args.out, SWEEP_COUNT_COLUMNS, rows, args.append)
    done = [row for row in rows if "fused" in row]
    batchnorms, fused = (sum(row[key] for row in done) for key in ("batchnorms", "fused"))
    print(f"{len(done)} models converted, {len(rows) - len(done)} failed; {fused} of "
          f"{batchnorms} BatchNorms fused ({fused / max(batchnorms, 1):.1%})")
    return 0


def summary(rows: list[dict]) -> str:
    """The totals of a sweep, as the README gives them."""
    done = [row for row in rows if "exact" in row]
    batchnorms = sum(row["batchnorms"] for row in done)
    fused = sum(row["fused"] for row in done)
    return (f"{len(rows)} models: {sum(row['exact'] for row in done)} exact in both modes "
            f"converted in either, {len(done) - sum(row['exact'] for row in done)} not, "
            f"{len(rows) - len(done)} not run; {sum(row['leaves'] > 0 for row in done)} with "
            f"leaves; {fused} of {batchnorms} BatchNorms fused "
            f"({fused / max(batchnorms, 1):.1%})")


if __name__ == "__main__":
    sys.exit(main())
