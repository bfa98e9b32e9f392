"""What the compiled kernels will do on an H100, read from the code ptxas makes for sm_90,
without a GPU: the static table perf/static_h100.csv.

For the BatchNorm layers of ResNet-50 at batch 128 (RESNET50_CHW), in bf16 channels_last and
float32 contiguous, with and without a residual, the real launchers make the launches of a
training forward (batch_stats, normalize_act), a training backward (normalize_act_backward:
the gradient reduction, then dx) and an eval forward (normalize_act on the running
statistics), planned for the H100's 132 SMs; each launched variant is compiled for sm_90
(perf/offline_compile.py) and read:

- regs, spill_bytes, local_ops: registers per thread; bytes of local memory (the cubin's stack
  frame and local size: spills, as nothing here indexes an array in local memory) and the local
  loads and stores in its SASS (LDL, STL);
- smem_bytes: shared memory per program, Triton's dynamic share plus the cubin's static one;
- programs, per_sm, waves: programs in the launch; how many of them one SM holds at once (by
  registers, shared memory, warps and its 32-program limit); programs / (132 * per_sm);
- loads, stores: each main tensor (x, dy, residual r, y, dx, d residual dr) the kernel reads
  or writes, with the width in bits of its narrowest global load or store. The PTX ties each
  ld.global / st.global to the kernel parameter its address comes from;
- sass_loads, sass_stores: every global load and store in the SASS (LDG, STG; main tensors and
  per-channel vectors alike), as width x count;
- mbytes, predicted_us: the main tensors' bytes, each read or written once, and the time they
  take at COPY_BANDWIDTH: a prediction, not a measurement.

    python perf/static_gpu.py --out perf/static_h100.csv    # refuses to write fewer rows
    python perf/static_gpu.py --check perf/static_h100.csv --shapes 64x56x56,2048x7x7

--check fails where a launch spills more than the table records, or reads or writes a main
tensor in narrower pieces (or not at all); it skips the SASS, whose columns it leaves empty.
"""
import argparse
import collections
import csv
import itertools
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from triton import knobs

from offline_compile import launches_compiled
from tritonbn import kernels
from tritonbn.activations import RELU

# The distinct (C, H, W) of the inputs of torchvision's resnet50's BatchNorm2d layers at 224x224.
RESNET50_CHW = ((64, 112, 112), (64, 56, 56), (128, 56, 56), (256, 56, 56), (128, 28, 28),
                (256, 28, 28), (512, 28, 28), (256, 14, 14), (512, 14, 14), (1024, 14, 14),
                (512, 7, 7), (2048, 7, 7))
BATCH = 128
FORMATS = ((torch.bfloat16, torch.channels_last), (torch.float32, torch.contiguous_format))
H100_SMS = 132
# Assumed device-to-device copy bandwidth of an H100 (bytes read + written per second): the
# figure perf/NOTES.md's byte model uses; every GPU sweep measures its own.
COPY_BANDWIDTH = 3.0e12
# Per-SM limits of sm_90: 64K registers (allocated per warp in units of 256), 64 warps, 32
# programs, 228 KB of shared memory.
REGISTERS, WARPS, PROGRAMS, SHARED = 65536, 64, 32, 228 * 1024
MAIN_TENSORS = {"x_ptr": "x", "dy_ptr": "dy", "r_ptr": "r", "y_ptr": "y", "dx_ptr": "dx",
                "dr_ptr": "dr"}
COLUMNS = ["shape", "dtype", "layout", "residual", "pass", "kernel", "programs", "per_sm",
           "waves", "regs", "spill_bytes", "local_ops", "smem_bytes", "loads", "stores",
           "sass_loads", "sass_stores", "mbytes", "predicted_us"]
# What identifies a row from one run to the next.
KEY = ["shape", "dtype", "layout", "residual", "pass", "kernel"]

_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?)\s*;", re.M)
_OPERAND = re.compile(r"\{[^}]*\}|\[[^\]]*\]|[^,\s][^,]*")
_REGISTER = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"\[\s*\w+_param_(\d+)\s*\]")
_ACCESS = re.compile(r"(ld|st)\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)")
_NO_DESTINATION = ("st.", "red.", "bar.", "bra", "ret")
_SASS = re.compile(r"\b(LDG|STG|LDL|STL)\b((?:\.\w+)*)")


def global_accesses(ptx: str) -> list:
    """(ld or st, parameter indices, bits) of every ld.global and st.global in ptx: the
    indices of the kernel parameters its address derives from, found by following the PTX
    back from the address registers through every instruction that defines a register to the
    ld.param instructions they started from."""
    sources, params, accesses = collections.defaultdict(set), {}, []
    for opcode, operands in _INSTRUCTION.findall(ptx):
        operands = _OPERAND.findall(operands)
        access = _ACCESS.fullmatch(opcode)
        if access:
            address = next(operand for operand in operands if operand.startswith("["))
            accesses.append((access[1], _REGISTER.findall(address),
                             int(access[2] or 1) * int(access[3])))
        if opcode.startswith(_NO_DESTINATION) or not operands:
            continue
        read = {register for operand in operands[1:] for register in _REGISTER.findall(operand)}
        param = _PARAM.fullmatch(operands[-1]) if opcode.startswith("ld.param") else None
        for register in _REGISTER.findall(operands[0]):
            sources[register] |= read
            if param:
                params[register] = int(param[1])
    result = []
    for kind, address, bits in accesses:
        seen, pending = set(address), list(address)
        while pending:
            for source in sources[pending.pop()] - seen:
                seen.add(source)
                pending.append(source)
        result.append((kind, {params[r] for r in seen if r in params}, bits))
    return result


def tensor_widths(compiled) -> tuple[dict, dict]:
    """({main tensor: narrowest load bits}, {main tensor: narrowest store bits}) of a launch."""
    runtime = [name for name, kind in compiled.signature.items() if kind != "constexpr"]
    widths = {"ld": {}, "st": {}}
    for kind, params, bits in global_accesses(compiled.kernel.asm["ptx"]):
        pointers = {runtime[i] for i in params
                    if i < len(runtime) and compiled.signature[runtime[i]].startswith("*")}
        assert len(pointers) == 1, (compiled.name, kind, pointers)
        tensor = MAIN_TENSORS.get(pointers.pop())
        if tensor:
            widths[kind][tensor] = min(bits, widths[kind].get(tensor, bits))
    return widths["ld"], widths["st"]


def read_cubin(cubin: bytes, sass: bool) -> tuple[dict, dict]:
    """(resources, accesses) of a cubin: its REG, STACK, SHARED, LOCAL... as cuobjdump
    -res-usage prints them, and {LDG, STG, LDL, STL: Counter of width in bits} of its SASS
    (empty unless sass: disassembling takes half a second a kernel)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage",
                               *(["-sass"] if sass else []), file.name],
                              capture_output=True, text=True, check=True).stdout
    resources = {key: int(value) for key, value in re.findall(r"\b([A-Z]+):(\d+)", text)}
    accesses = collections.defaultdict(collections.Counter)
    for op, modifiers in _SASS.findall(text):
        sizes = re.findall(r"\.U?S?(8|16|64|128)\b", modifiers)
        accesses[op][int(sizes[0]) if sizes else 32] += 1
    return resources, accesses


def programs_per_sm(regs: int, warps: int, smem: int) -> int:
    """How many programs of a kernel one sm_90 SM holds at once."""
    warp_registers = math.ceil(regs * 32 / 256) * 256
    by_registers = REGISTERS // warp_registers // warps
    by_shared = SHARED // smem if smem else PROGRAMS
    return min(by_registers, WARPS // warps, PROGRAMS, by_shared)


def fmt_widths(widths: dict) -> str:
    return " ".join(f"{tensor}:{bits}" for tensor, bits in sorted(widths.items()))


def fmt_counts(counts: collections.Counter) -> str:
    return " ".join(f"{bits}x{n}" for bits, n in sorted(counts.items(), reverse=True))


def kernel_facts(compiled, sass: bool) -> dict:
    """The columns that depend on the compiled variant alone (the SASS ones empty unless
    sass)."""
    usage, accesses = read_cubin(compiled.kernel.asm["cubin"], sass)
    loads, stores = tensor_widths(compiled)
    smem = compiled.kernel.metadata.shared + usage["SHARED"]
    return dict(regs=usage["REG"], spill_bytes=usage["STACK"] + usage["LOCAL"],
                local_ops=sum(accesses["LDL"].values()) + sum(accesses["STL"].values()),
                smem_bytes=smem, loads=loads, stores=stores,
                sass_loads=fmt_counts(accesses["LDG"]), sass_stores=fmt_counts(accesses["STG"]),
                per_sm=programs_per_sm(usage["REG"], compiled.kernel.metadata.num_warps, smem))


def layer_passes(launches, shape, dtype, layout, residual) -> dict:
    """{pass: its launches} of a BatchNormAct2d with ReLU and momentum 0.1 on shape, taken from
    launches, the list launches_compiled yields, which it leaves empty."""
    x, dy = (torch.empty(shape, dtype=dtype, memory_format=layout) for _ in range(2))
    r = torch.empty(shape, dtype=dtype, memory_format=layout) if residual else None
    weight, bias, running_mean, running_var = (torch.empty(shape[1]) for _ in range(4))
    tracked = torch.zeros((), dtype=torch.int64)
    passes = {}
    mean, var = kernels.batch_stats(x, running_mean, running_var, 0.1, tracked)
    kernels.normalize_act(x, mean, var, weight, bias, r, 1e-5, RELU, 0.0)
    passes["train_fwd"], launches[:] = launches[:], []
    kernels.normalize_act_backward(dy, x, mean, var, weight, bias, r, 1e-5, True, RELU, 0.0)
    passes["train_bwd"], launches[:] = launches[:], []
    kernels.normalize_act(x, running_mean, running_var, weight, bias, r, 1e-5, RELU, 0.0)
    passes["eval_fwd"], launches[:] = launches[:], []
    return passes


def static_rows(layers=RESNET50_CHW, sass=True) -> list[dict]:
    """The table's rows for the layers of the given (C, H, W); sass: with the columns read from
    the SASS."""
    rows, facts = [], {}
    with launches_compiled(["sm_90"], sms=H100_SMS) as launches:
        for chw, (dtype, layout), residual in itertools.product(layers, FORMATS, (False, True)):
            shape = (BATCH, *chw)
            for name, compiled_launches in layer_passes(launches, shape, dtype, layout,
                                                        residual).items():
                for compiled in compiled_launches:
                    rows.append(row(compiled, shape, dtype, layout, residual, name, facts, sass))
    return rows


def row(compiled, shape, dtype, layout, residual, name, facts, sass) -> dict:
    """The table's row of one launch; facts caches kernel_facts by kernel."""
    if compiled.kernel not in facts:
        facts[compiled.kernel] = kernel_facts(compiled, sass)
    kernel = facts[compiled.kernel]
    touched = {compiled.arguments[param] for param, tensor in MAIN_TENSORS.items()
               if tensor in {**kernel["loads"], **kernel["stores"]}}
    nbytes = sum(t.numel() * t.element_size() for t in touched)
    programs = math.prod(compiled.grid)
    return dict(shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
                layout="channels_last" if layout == torch.channels_last else "contiguous",
                residual=residual, **{"pass": name}, kernel=compiled.name.strip("_"),
                programs=programs, waves=f"{programs / (H100_SMS * kernel['per_sm']):.2f}",
                mbytes=f"{nbytes / 1e6:.1f}", predicted_us=f"{nbytes / COPY_BANDWIDTH * 1e6:.1f}",
                **{**kernel, "loads": fmt_widths(kernel["loads"]),
                   "stores": fmt_widths(kernel["stores"])})


def parse_widths(text: str) -> dict:
    """fmt_widths' inverse."""
    return {tensor: int(bits) for tensor, bits in (item.split(":") for item in text.split())}


def regressions(committed: list[dict], rows: list[dict]) -> list[str]:
    """What rows lose against the committed table, for the layers both hold: a spill that
    grew, a main tensor no longer read or written, or read or written in narrower pieces."""
    fresh = {tuple(row[k] for k in KEY): row for row in rows}
    layers = {key[:4] for key in fresh}
    problems = []
    for old in committed:
        key = tuple(old[k] for k in KEY)
        new = fresh.get(key)
        if key[:4] not in layers:
            continue
        if new is None:
            problems.append(f"{key}: no longer launched")
            continue
        if int(new["spill_bytes"]) > int(old["spill_bytes"]):
            problems.append(f"{key}: spill_bytes {old['spill_bytes']} -> {new['spill_bytes']}")
        for column in ("loads", "stores"):
            now = parse_widths(new[column])
            for tensor, bits in parse_widths(old[column]).items():
                if now.get(tensor, 0) < bits:
                    problems.append(f"{key}: {column} of {tensor} {bits} bits -> "
                                    + (f"{now[tensor]} bits" if tensor in now else "none"))
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="write the table here")
    action.add_argument("--check", type=Path, help="compare against this table")
    parser.add_argument("--shapes", help="comma-separated CxHxW of RESNET50_CHW (default all)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a table that has more rows than the new one")
    args = parser.parse_args(argv)
    chw = RESNET50_CHW
    if args.shapes:
        chw = tuple(tuple(map(int, s.split("x"))) for s in args.shapes.split(","))
        if not set(chw) <= set(RESNET50_CHW):
            parser.error(f"--shapes must be among {RESNET50_CHW}")
    rows = [{k: str(v) for k, v in row.items()}
            for row in static_rows(chw, sass=not args.check)]
    if args.check:
        with open(args.check, newline="") as f:
            problems = regressions(list(csv.DictReader(f)), rows)
        print("\n".join(problems) or f"{len(rows)} launches hold the widths and spills of "
                                        f"{args.check}")
        return 1 if problems else 0
    if args.out.exists() and not args.force:
        with open(args.out, newline="") as f:
            old_rows = sum(1 for _ in csv.DictReader(f))
        if old_rows > len(rows):
            print(f"{args.out} has {old_rows} rows, this run {len(rows)}: not overwritten "
                  f"(--force overwrites it)")
            return 1
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} launches to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
