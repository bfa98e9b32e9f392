"""summary.md for perf/gpu_check.sh: what ran, what passed, and the key ratios.

Reads the step folder that gpu_check.sh fills (plan.tsv, steps.tsv, environment.log, the
tests' JUnit XML, headline.csv from perf/sweep.py --headline, host.csv from
perf/host_overhead.py --out, resnet/<name>.csv from perf/resnet.py) and writes the summary. A
step whose output is missing or unreadable shows as "did not run / failed", never as a number.
perf/NOTES.md and the README take their GPU figures from the "Key figures" table.

    python perf/summarize.py STEP_DIR SUMMARY_MD
"""
import argparse
import math
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pandas as pd

from plot import p50_by_provider

MISSING = "did not run / failed"
SECTIONS = ("Steps", "Environment", "Tests", "Headline: BN + ReLU on the ResNet-50 shapes",
            "Host time per layer", "ResNet-50 training step", "Key figures")
TEST_STEPS = {"gpu_tests": "GPU-first tests", "suite": "the rest of the suite"}
HOST_MODES = ("train_fwd", "train_fwdbwd", "eval_fwd")
RESNET_PAIRS = (("converted", "eager"), ("cudagraphs", "eager"),
                ("cudagraphs_converted", "cudagraphs"), ("compile_converted", "compile"))


def read_csv(path: Path, sep: str = ",") -> pd.DataFrame | None:
    try:
        df = pd.read_csv(path, sep=sep)
    except (OSError, ValueError):  # missing, empty or cut short
        return None
    return df if len(df) else None


def read_steps(step_dir: Path) -> list[dict]:
    """The planned steps (name, what, cap) with their outcome where they ran."""
    plan = read_csv(step_dir / "plan.tsv", sep="\t")
    if plan is None:
        return []
    done = read_csv(step_dir / "steps.tsv", sep="\t")
    outcomes = {} if done is None else {row.name: row for row in done.itertuples(index=False)}
    rows = []
    for step in plan.itertuples(index=False):
        outcome = outcomes.get(step.name)
        rows.append(dict(name=step.name, what=step.what,
                         cap=step.cap if outcome is None else outcome.cap,
                         result=MISSING if outcome is None else step_result(outcome.rc),
                         seconds="" if outcome is None else f"{outcome.seconds:.0f}"))
    return rows


def step_result(rc) -> str:
    if str(rc) == "skipped":
        return "not started: no time left"
    rc = int(rc)
    if rc == 0:
        return "ok"
    if rc in (124, 137):
        return "timed out at its cap"
    return f"failed (exit {rc})"


def fmt(value, spec: str = ".2f", suffix: str = "x") -> str:
    return MISSING if value is None or pd.isna(value) else f"{value:{spec}}{suffix}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def environment_section(step_dir: Path) -> tuple[list[str], dict]:
    path = step_dir / "environment.log"
    env = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition(": ")
            if sep and re.fullmatch(r"[a-z_]+", key):  # not a warning on stderr
                env[key.strip()] = value.strip()
    if "device" not in env:
        return [MISSING], env
    return table(["", ""], [[key, value] for key, value in env.items()]), env


def junit_results(path: Path) -> dict | None:
    """Counts and the failed tests' names from a pytest JUnit XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = dict(passed=0, failed=0, skipped=0)
    failed = []
    for case in root.iter("testcase"):
        outcome = next((child.tag for child in case
                        if child.tag in ("failure", "error", "skipped")), None)
        if outcome in ("failure", "error"):
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif outcome == "skipped":
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts, failed_names=failed)


def tests_section(tests: dict, step_results: dict) -> list[str]:
    rows = []
    for step, what in TEST_STEPS.items():
        junit, result = tests[step], step_results.get(step, MISSING)
        if junit is None:
            rows.append([what, result, MISSING, "", "", ""])
            continue
        rows.append([what, result, junit["passed"], junit["failed"], junit["skipped"],
                     ", ".join(f"`{name}`" for name in junit["failed_names"]) or "none"])
    return table(["tests", "step", "passed", "failed", "skipped", "failed by name"], rows) + [
        "", "A step cut off by its cap counts the tests that finished before it."]


def headline_figures(df: pd.DataFrame | None) -> dict:
    """Per case, tritonbn's speedup over the faster peer on GPU time and on wall time."""
    if df is None or "tritonbn" not in set(df.provider) or df.interpreter.any():
        return {}
    cases = p50_by_provider(df).reset_index()
    cases["format"] = cases.dtype + " " + cases.layout
    return {"cases": cases}


def geomean(values: pd.Series) -> float:
    values = values.dropna()
    return math.exp(values.map(math.log).mean()) if len(values) else float("nan")


def worst(cases: pd.DataFrame, column: str) -> str:
    known = cases.dropna(subset=[column])
    if known.empty:
        return MISSING
    row = known.loc[known[column].idxmin()]
    residual = " + residual" if row.residual else ""
    return f"{row[column]:.2f}x ({row['shape']} {row.format}{residual} {row['mode']})"


def headline_section(df: pd.DataFrame | None, figures: dict, log: Path) -> list[str]:
    if df is None:
        return [MISSING]
    lines = [f"{df[['shape', 'dtype', 'layout', 'residual']].drop_duplicates().shape[0]} "
             f"cases, {len(df)} rows; providers {', '.join(dict.fromkeys(df.provider))}."]
    if log.exists():  # a sweep stopped by its time limit says how far it got
        lines += [line.strip() for line in log.read_text().splitlines()
                  if line.startswith("--max-seconds reached")]
    errors = df[df.error.notna()] if "error" in df.columns else df.iloc[:0]
    if len(errors):
        lines.append(f"{len(errors)} rows failed: " + "; ".join(
            f"{r.shape} {r.dtype} {r.mode} {r.provider}: {r.error}"
            for r in errors.head(5).itertuples()))
    if df.interpreter.any():
        ours = df[df.provider == "tritonbn"]
        lines.append(f"Interpreter rows: no GPU timings. Largest error of tritonbn against "
                     f"eager: y {ours.max_abs_err.max():.1e}, dx {ours.max_abs_err_dx.max():.1e}.")
        return lines
    if not figures:
        return lines + [f"tritonbn: {MISSING}"]
    cases = figures["cases"]
    rows = []
    for (fmt_name, mode), group in cases.groupby(["format", "mode"], sort=False):
        rows.append([fmt_name, mode, len(group),
                     fmt(geomean(group.gpu_speedup_vs_best_peer)),
                     worst(group, "gpu_speedup_vs_best_peer"),
                     fmt(geomean(group.speedup_vs_best_peer)),
                     worst(group, "speedup_vs_best_peer")])
    lines.append("")
    lines += table(["format", "mode", "cases", "gpu_ms speedup, geomean", "gpu_ms, worst",
                    "wall speedup, geomean", "wall, worst"], rows)
    lines.append("")
    lines.append("Speedup: the faster of eager and torch.compile over tritonbn, per case; "
                 "gpu_ms from CUDA-graph replays, wall from do_bench.")
    return lines


def host_ratios(df: pd.DataFrame | None) -> dict:
    """{(label, mode): (ours us, theirs us)} for the layer modes, the pair alone and the
    stack."""
    if df is None:
        return {}
    us = df.set_index(["part", "provider", "mode"]).us
    pairs = {}
    for ours, theirs in (("tritonbn", "eager"), ("tritonbn_compile", "compile")):
        for mode in HOST_MODES:
            if ("layer", ours, mode) in us and ("layer", theirs, mode) in us:
                pairs[(f"{ours} / {theirs}", mode)] = (us["layer", ours, mode],
                                                       us["layer", theirs, mode])
    for part, ours, theirs, mode in (("pair_alone", "tritonbn", "eager", "train_fwdbwd"),
                                     ("stack", "converted", "eager", "sgd_step")):
        if (part, ours, mode) in us and (part, theirs, mode) in us:
            pairs[(f"{part}: {ours} / {theirs}", mode)] = (us[part, ours, mode],
                                                           us[part, theirs, mode])
    return pairs


def host_section(df: pd.DataFrame | None, ratios: dict) -> list[str]:
    if df is None:
        return [MISSING]
    lines = []
    if df.stubbed.any():
        lines += ["Launches stubbed out (no GPU): Python and dispatch above the launches "
                  "only, and no eager per-mode figures to compare with.", ""]
    layer = df[df.part == "layer"].pivot_table(index="mode", columns="provider", values="us")
    lines += table(["mode"] + [f"{p} us" for p in layer.columns],
                   [[mode] + [fmt(v, ".1f", "") for v in row] for mode, row in layer.iterrows()])
    lines.append("")
    lines += table(["compared", "mode", "ours us", "theirs us", "ratio"],
                   [[label, mode, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}"]
                    for (label, mode), (ours, theirs) in ratios.items()] or
                   [[MISSING, "", "", "", ""]])
    return lines


def resnet_section(df: pd.DataFrame | None) -> list[str]:
    if df is None:
        return [MISSING]
    lines = []
    if df.interpreter.any():
        lines += [f"Interpreter rehearsal on a {df.model.iloc[0]}: not GPU timings.", ""]
    lines += table(["batch", "variant", "ms/step", "images/s", "BN+ReLU kernels"],
                   [[r.batch_size, r.variant, f"{r.ms_per_step:.1f}", f"{r.images_per_s:.0f}",
                     "" if pd.isna(r.bn_act_share) else f"{100 * r.bn_act_share:.1f}%"]
                    for r in df.itertuples()])
    return lines


def resnet_ratio(df: pd.DataFrame | None, variant: str, baseline: str) -> str:
    """baseline's ms per step over variant's, at the largest batch: above 1 means faster."""
    if df is None or df.interpreter.any():
        return MISSING
    df = df[df.batch_size == df.batch_size.max()].set_index("variant").ms_per_step
    if variant not in df or baseline not in df:
        return MISSING
    return f"{df[baseline] / df[variant]:.2f}x"


def key_figures(figures: dict, ratios: dict, resnet: pd.DataFrame | None, tests: dict,
                step_results: dict) -> list[str]:
    rows = []
    for step, what in TEST_STEPS.items():
        junit, result = tests[step], step_results.get(step, MISSING)
        counts = (MISSING if junit is None
                  else f"{junit['failed']} / {junit['passed'] + junit['failed']}")
        rows.append([f"{what}: failed / run",
                     counts if result in ("ok", MISSING) else f"{counts} ({result})"])
    cases = figures.get("cases")
    for column, clock in (("gpu_speedup_vs_best_peer", "gpu_ms"),
                          ("speedup_vs_best_peer", "wall time")):
        mean = lowest = MISSING
        if cases is not None:
            known = cases[column].notna().sum()
            mean = f"{fmt(geomean(cases[column]))} over {known} of {len(cases)} cases"
            lowest = worst(cases, column)
        rows += [[f"headline {clock} speedup vs best peer, geomean", mean],
                 [f"headline {clock} speedup vs best peer, worst", lowest]]
    for label in ("tritonbn / eager", "tritonbn_compile / compile"):
        value = ratios.get((label, "train_fwdbwd"))
        rows.append([f"host time per layer, {label}, train_fwdbwd",
                     MISSING if value is None else f"{value[0] / value[1]:.2f}"])
    for variant, baseline in RESNET_PAIRS:
        rows.append([f"ResNet-50 bs128 {variant} vs {baseline} (speedup)",
                     resnet_ratio(resnet, variant, baseline)])
    return table(["figure", "value"], rows)


def summary(step_dir: Path) -> str:
    steps = read_steps(step_dir)
    step_results = {step["name"]: step["result"] for step in steps}
    env_lines, env = environment_section(step_dir)
    tests = {step: junit_results(step_dir / f"{step}.xml") for step in TEST_STEPS}
    headline = read_csv(step_dir / "headline.csv")
    host = read_csv(step_dir / "host.csv")
    resnet_csvs = sorted((step_dir / "resnet").glob("*.csv"))  # named after the device
    resnet = read_csv(resnet_csvs[0]) if resnet_csvs else None
    figures = headline_figures(headline)
    ratios = host_ratios(host)
    no_gpu = "device" in env and env["device"].startswith("cpu")
    lines = ["# GPU check", ""]
    if no_gpu:
        lines += ["**No GPU: a rehearsal.** The kernels ran through Triton's interpreter on "
                  "tiny shapes with tiny step counts and short caps; no figure below is a GPU "
                  "timing.", ""]
    bodies = {
        "Steps": table(["step", "what", "result", "seconds", "cap s"],
                       [[s["name"], s["what"], s["result"], s["seconds"], s["cap"]]
                        for s in steps]) if steps else [MISSING],
        "Environment": env_lines,
        "Tests": tests_section(tests, step_results),
        "Headline: BN + ReLU on the ResNet-50 shapes": headline_section(
            headline, figures, step_dir / "headline.log"),
        "Host time per layer": host_section(host, ratios),
        "ResNet-50 training step": resnet_section(resnet),
        "Key figures": key_figures(figures, ratios, resnet, tests, step_results),
    }
    for section in SECTIONS:
        lines += [f"## {section}", "", *bodies[section], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step_dir", type=Path)
    parser.add_argument("summary", type=Path)
    args = parser.parse_args(argv)
    args.summary.write_text(summary(args.step_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
