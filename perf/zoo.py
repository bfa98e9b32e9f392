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
imported is skipped with a message.

    python perf/zoo.py --counts-only
    TRITON_INTERPRET=1 python perf/zoo.py --models timm/regnety_008 --append
    python perf/zoo.py --models torchvision/resnet18,timm/efficientnet_b0 --image-size 32
"""
import argparse
import collections
import copy
import csv
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

import tritonbn
from tritonbn import ops

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


def build(model_name: str) -> nn.Module:
    """torchvision/<name> or timm/<name>, with random weights."""
    source, name = model_name.split("/")
    if source not in ("torchvision", "timm"):
        raise ValueError(f"unknown model source {source!r} in {model_name!r}")
    try:
        import timm
        import torchvision.models
    except Exception as error:  # torchvision's C++ ops fail to load on a mismatched torch
        raise ImportError(f"{type(error).__name__}: {error}") from error
    if source == "torchvision":
        return getattr(torchvision.models, name)(weights=None)
    return timm.create_model(name, pretrained=False)


def census(model: nn.Module, converted: nn.Module) -> dict:
    """The counts of the table, and the reasons for what was left alone, each with its count."""
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    pairs = converted.fused_pairs
    reasons = collections.Counter(converted.left_alone.values())
    return dict(batchnorms=batchnorms, fused=len({pair.bn for pair in pairs}),
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
               if ops.runs_triton(probe) else "reference")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated torchvision/<name> or timm/<name>")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--counts-only", action="store_true", help="convert and count only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to write")
    parser.add_argument("--append", action="store_true", help="add the rows to --out")
    args = parser.parse_args(argv)

    rows = []
    for model_name in args.models.split(","):
        try:
            rows += run(model_name, args.image_size, args.batch, args.counts_only, args.seed)
        except ImportError as error:  # also torchvision's broken C++ ops on some wheels
            print(f"skipping {model_name}: {error}", file=sys.stderr)
            continue
        print(markdown(rows[-1:], COUNT_COLUMNS + CHECK_COLUMNS), flush=True)
    columns = COUNT_COLUMNS + ([] if args.counts_only else CHECK_COLUMNS) + RUN_COLUMNS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not (args.append and args.out.exists())
    with open(args.out, "w" if new_file else "a", newline="") as file:
        writer = csv.DictWriter(file, columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows, columns[:-len(RUN_COLUMNS)] + ["backend", "seconds"]))
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
