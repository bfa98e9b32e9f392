"""Convergence with and without BatchNorm, after Ioffe & Szegedy (2015), Figure 1(a).

Two networks on scikit-learn's bundled 8x8 digits (MNIST is not downloaded here):

- mlp: 3 hidden layers of 100 sigmoid units, as in the paper, with and without BatchNorm
  before each sigmoid;
- cnn: two conv -> BatchNorm -> ReLU stages and a linear classifier, with and without BatchNorm.

Each BatchNorm network trains twice from the same initial weights on the same batches: with
nn.BatchNorm1d/2d followed by the activation module (bn_impl "torch") and with tritonbn's
BatchNormAct1d/2d (bn_impl "tritonbn"), whose weights are loaded from the former's state_dict.
Test loss and accuracy every --eval-every steps go to <out-dir>/convergence.csv (long format)
and <out-dir>/convergence.png. The two implementations must agree: final test accuracy within
0.5 points and every test loss within LOSS_ATOL + LOSS_RTOL * loss; the script prints the check
and exits with status 1 when it fails.

On CPU, tritonbn runs its PyTorch reference, or its Triton kernels through the interpreter when
TRITON_INTERPRET=1 is set (slow: use few steps and --test-size); --device cuda runs the kernels.

    python perf/convergence.py --steps 2000 --device cuda
"""
import argparse
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
import torch
from sklearn.datasets import load_digits
from torch import nn

import tritonbn
from tritonbn.dispatch import runs_triton

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

MODELS = ("mlp", "cnn")
# (variant, bn_impl) runs per model, in training order.
RUNS = (("no_bn", "none"), ("bn", "torch"), ("bn", "tritonbn"))
ACC_TOLERANCE_POINTS = 0.5
LOSS_ATOL, LOSS_RTOL = 0.01, 0.02
LEARNING_RATE = {"mlp": 0.5, "cnn": 0.05}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Digits:
    x_train: torch.Tensor  # [n_train, 1, 8, 8] float32, pixels scaled to [0, 1]
    y_train: torch.Tensor  # [n_train] int64 labels 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(test_size: int, seed: int, device: torch.device) -> Digits:
    """The 1797 digits split at random into test_size test images and the rest for training."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return Digits(*(t.to(device) for t in (x[train], y[train], x[test], y[test])))


def hidden_layer(index: int, linear: nn.Module, bn_impl: str,
                 activation: str) -> list[tuple[str, nn.Module]]:
    """Named layers of one hidden layer. The names make the state_dict keys of the torch and
    tritonbn networks the same: fc1, bn1, act1 against fc1, bn1 (a BatchNormAct)."""
    features = linear.out_features if isinstance(linear, nn.Linear) else linear.out_channels
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]()
    layers = [(f"fc{index}", linear)]
    if bn_impl == "none":
        return layers + [(f"act{index}", act)]
    conv = isinstance(linear, nn.Conv2d)
    if bn_impl == "torch":
        bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(features)
        return layers + [(f"bn{index}", bn), (f"act{index}", act)]
    bn_act = tritonbn.BatchNormAct2d if conv else tritonbn.BatchNormAct1d
    return layers + [(f"bn{index}", bn_act(features, activation=activation))]


def build_model(model: str, bn_impl: str, seed: int) -> nn.Sequential:
    """The network; the same seed gives the same linear and conv weights for every bn_impl
    (BatchNorm draws no random numbers). Conv nets are channels_last."""
    torch.manual_seed(seed)
    if model == "mlp":
        layers = [("flatten", nn.Flatten())]
        for index, fan_in in enumerate((64, 100, 100), start=1):
            layers += hidden_layer(index, nn.Linear(fan_in, 100), bn_impl, "sigmoid")
        return nn.Sequential(OrderedDict(layers + [("classifier", nn.Linear(100, 10))]))
    conv_bias = bn_impl == "none"  # BatchNorm's shift makes a conv bias redundant
    layers = hidden_layer(1, nn.Conv2d(1, 16, 3, padding=1, bias=conv_bias), bn_impl, "relu")
    layers += hidden_layer(2, nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=conv_bias),
                           bn_impl, "relu")
    layers += [("flatten", nn.Flatten()), ("classifier", nn.Linear(32 * 4 * 4, 10))]
    return nn.Sequential(OrderedDict(layers)).to(memory_format=torch.channels_last)


def batch_schedule(n_train: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Training indices for every step: shuffled epochs, the same for every run."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = n_train // batch_size
    batches = []
    while len(batches) < steps:
        order = torch.randperm(n_train, generator=generator)
        batches += list(order[:per_epoch * batch_size].split(batch_size))
    return batches[:steps]


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) on the test set, in eval mode."""
    model.eval()
    logits = model(data.x_test)
    model.train()
    loss = nn.functional.cross_entropy(logits, data.y_test).item()
    accuracy = 100.0 * (logits.argmax(1) == data.y_test).sum().item() / len(data.y_test)
    return loss, accuracy


def train(model: nn.Module, lr: float, data: Digits, batches: list[torch.Tensor],
          eval_every: int) -> list[tuple[int, float, float]]:
    """Plain SGD over the batches; (step, test loss, test accuracy) at step 0, every
    eval_every steps and at the end."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    curve = [(0, *evaluate(model, data))]
    for step, index in enumerate(batches, start=1):
        index = index.to(data.x_train.device)
        loss = nn.functional.cross_entropy(model(data.x_train[index]),
                                           data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == len(batches):
            curve.append((step, *evaluate(model, data)))
    return curve


def agreement(results: pd.DataFrame) -> list[str]:
    """One line per model comparing the tritonbn curves with the torch ones; the lines of
    failed checks start with FAIL."""
    lines = []
    for model, frame in results[results.variant == "bn"].groupby("model", sort=False):
        torch_run = frame[frame.bn_impl == "torch"].set_index("step")
        ours = frame[frame.bn_impl == "tritonbn"].set_index("step")
        loss_gap = (ours.test_loss - torch_run.test_loss).abs()
        loss_allowed = LOSS_ATOL + LOSS_RTOL * torch_run.test_loss
        acc_gap = abs(ours.test_acc.iloc[-1] - torch_run.test_acc.iloc[-1])
        ok = acc_gap <= ACC_TOLERANCE_POINTS and bool((loss_gap <= loss_allowed).all())
        lines.append(f"{'ok  ' if ok else 'FAIL'} {model}: final test accuracy "
                     f"{torch_run.test_acc.iloc[-1]:.2f}% (torch) vs {ours.test_acc.iloc[-1]:.2f}% "
                     f"(tritonbn), gap {acc_gap:.2f} points (allowed {ACC_TOLERANCE_POINTS}); "
                     f"largest test-loss gap {loss_gap.max():.2e} "
                     f"(allowed {LOSS_ATOL} + {LOSS_RTOL} * loss)")
    return lines


def plot(results: pd.DataFrame, path: Path, title: str) -> None:
    styles = {("no_bn", "none"): dict(color="0.5", label="no BatchNorm"),
              ("bn", "torch"): dict(color="tab:blue", label="nn.BatchNorm + activation"),
              ("bn", "tritonbn"): dict(color="tab:orange", linestyle="--",
                                       label="tritonbn BatchNormAct")}
    models = list(dict.fromkeys(results.model))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        for (variant, bn_impl), run in results[results.model == model].groupby(
                ["variant", "bn_impl"], sort=False):
            style = styles[(variant, bn_impl)]
            axes[0, column].plot(run.step, run.test_acc, **style)
            axes[1, column].plot(run.step, run.test_loss, **style)
        axes[0, column].set(title=model, ylabel="test accuracy (%)")
        axes[1, column].set(xlabel="training step", ylabel="test loss", yscale="log")
        axes[0, column].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe_backend(device: torch.device) -> str:
    """Which code runs tritonbn's op on device."""
    if device.type == "cuda":
        return f"Triton kernels on {torch.cuda.get_device_name(device)}"
    if runs_triton(torch.empty(0, device=device)):
        return "Triton kernels through the interpreter on CPU"
    return "PyTorch reference on CPU (TRITON_INTERPRET=1 interprets the kernels instead)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=60, help="60, as in the paper")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--test-size", type=int, default=400, help="held-out images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":  # the torch runs must be repeatable for the comparison to mean much
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    data = load_data(args.test_size, args.seed, device)
    batches = batch_schedule(len(data.y_train), args.steps, args.batch_size, args.seed)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"data: scikit-learn 8x8 digits (load_digits; MNIST cannot be downloaded here): "
          f"{len(data.y_train)} training and {len(data.y_test)} test images, 10 classes")
    print(f"tritonbn: {describe_backend(device)}; {args.steps} steps of batch "
          f"{args.batch_size}, plain SGD")

    rows = []
    for model_name in MODELS:
        state = None
        for variant, bn_impl in RUNS:
            model = build_model(model_name, bn_impl, args.seed).to(device)
            if bn_impl == "tritonbn":  # start from the torch run's weights, through its keys
                model.load_state_dict(state, strict=True)
            elif bn_impl == "torch":
                state = {k: v.clone() for k, v in model.state_dict().items()}
            start = time.perf_counter()
            curve = train(model, LEARNING_RATE[model_name], data, batches, args.eval_every)
            seconds = time.perf_counter() - start
            rows += [dict(model=model_name, variant=variant, bn_impl=bn_impl, step=step,
                          test_loss=loss, test_acc=acc, device=device_name)
                     for step, loss, acc in curve]
            print(f"{model_name:>4} {variant:>6} {bn_impl:>8}: test accuracy "
                  f"{curve[-1][2]:6.2f}%, test loss {curve[-1][1]:.4f} ({seconds:.1f} s)")

    results = pd.DataFrame(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out_dir / "convergence.csv", index=False)
    plot(results, args.out_dir / "convergence.png",
         f"8x8 digits, batch {args.batch_size}, plain SGD, {device_name}")
    print(f"wrote {args.out_dir / 'convergence.csv'} and {args.out_dir / 'convergence.png'}")
    lines = agreement(results)
    print("agreement of tritonbn with nn.BatchNorm:", *lines, sep="\n  ")
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
