"""Plots and a markdown table from a sweep CSV (perf/sweep.py).

Writes two PNGs next to the CSV: <name>-speedup.png, tritonbn's train_fwdbwd speedup over the
best peer (the faster of eager and torch.compile) per shape, on wall time and, where the sweep
measured it, on GPU time (gpu_ms), and <name>-copy-bw.png, tritonbn's
bandwidth on the 8-pass model as a % of the copy bandwidth, per shape and mode; bars grouped
by dtype and layout, relu rows only. Then prints a markdown table for the README.

Only pandas and matplotlib: it runs wherever the CSV is, GPU or not. Rows from Triton's
interpreter (a sweep without a GPU) get the table without speedups or bandwidth, and no plots:
their times measure the interpreter, not the kernels.
"""
import argparse
from pathlib import Path

import pandas as pd

CASE = ["shape", "dtype", "layout", "activation", "residual", "mode"]
PROVIDERS = ("eager", "compile", "tritonbn", "tritonbn_compile")
PEERS = ["eager", "compile"]


def with_residual_column(df: pd.DataFrame) -> pd.DataFrame:
    """Sweeps from before residual rows have no residual column: none of their rows had one."""
    return df if "residual" in df.columns else df.assign(residual=False)


def relu_rows(df: pd.DataFrame) -> pd.DataFrame:
    """BN + ReLU rows without a residual: the rows every shape and format has."""
    df = with_residual_column(df)
    return df[(df.activation == "relu") & ~df.residual.astype(bool)]


def speedup_vs_best_peer(df: pd.DataFrame, order: pd.MultiIndex, time_column: str) -> pd.Series:
    """Per case, the faster peer's time_column over tritonbn's."""
    times = df.set_index(CASE + ["provider"])[time_column].unstack("provider").reindex(order)
    best_peer = times[[p for p in PEERS if p in times.columns]].min(axis=1)
    return best_peer / times["tritonbn"]


def has_gpu_times(df: pd.DataFrame) -> bool:
    return "gpu_ms" in df.columns and df["gpu_ms"].notna().any()


def p50_by_provider(df: pd.DataFrame) -> pd.DataFrame:
    """One row per case (in sweep order), one p50 column per provider, then tritonbn's speedup
    over the best peer on wall time and on GPU time (GPU rows only), its % of copy bandwidth and
    its max errors."""
    df = with_residual_column(df)
    order = pd.MultiIndex.from_frame(df[CASE].drop_duplicates())
    table = df.set_index(CASE + ["provider"])["ms_p50"].unstack("provider")
    table = table.reindex(index=order, columns=[p for p in PROVIDERS if p in table.columns])
    tritonbn = df[df.provider == "tritonbn"].set_index(CASE).reindex(order)
    if not df.interpreter.any():
        table["speedup_vs_best_peer"] = speedup_vs_best_peer(df, order, "ms_p50")
    if has_gpu_times(df):
        table["gpu_speedup_vs_best_peer"] = speedup_vs_best_peer(df, order, "gpu_ms")
    table["pct_copy_bw"] = tritonbn["pct_copy_bw"]
    table["max_abs_err"] = tritonbn["max_abs_err"]
    table["max_abs_err_dx"] = tritonbn["max_abs_err_dx"]
    return table


def summary_table(df: pd.DataFrame, modes=None) -> str:
    """The markdown table of p50_by_provider, for the given modes (all by default), less the
    columns without a value."""
    if modes is not None:
        df = df[df["mode"].isin(modes)]
    table = p50_by_provider(df).reset_index().dropna(axis="columns", how="all")
    formats = {**{p: "{:.3f}" for p in PROVIDERS}, "speedup_vs_best_peer": "{:.2f}x",
               "gpu_speedup_vs_best_peer": "{:.2f}x",
               "pct_copy_bw": "{:.0f}%", "max_abs_err": "{:.1e}", "max_abs_err_dx": "{:.1e}"}
    header = [f"{c} ms" if c in PROVIDERS else c for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [("" if pd.isna(v) else formats[c].format(v)) if c in formats else str(v)
                 for c, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_shape_and_format(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """column as a shape x "dtype layout" frame, both in sweep order. A 5-D channels_last_3d
    bar joins the channels_last group: its shape label already says it is 5-D."""
    table = table.reset_index()
    table["format"] = table["dtype"] + " " + table["layout"].str.removesuffix("_3d")
    wide = table.set_index(["shape", "format"])[column].unstack("format")
    return wide.reindex(index=table["shape"].drop_duplicates(),
                        columns=table["format"].drop_duplicates())


def device_label(df: pd.DataFrame) -> str:
    interpreted = " (Triton interpreter: not GPU timings)" if df.interpreter.any() else ""
    return f"{df.gpu.iloc[0]}{interpreted}"


def pyplot():
    """matplotlib's pyplot, drawing to files only; imported on first use, as the tables (which
    perf/sweep.py and perf/summarize.py print) need pandas alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bar_chart(ax, wide: pd.DataFrame, ylabel: str, title: str) -> None:
    wide.plot.bar(ax=ax, width=0.8, rot=45)
    ax.set_xlabel("")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")


def plot_speedup(df: pd.DataFrame, path: Path) -> None:
    relu = relu_rows(df)
    table = p50_by_provider(relu[relu["mode"] == "train_fwdbwd"])
    panels = [("speedup_vs_best_peer", "wall time")]
    if "gpu_speedup_vs_best_peer" in table.columns:
        panels.append(("gpu_speedup_vs_best_peer", "GPU time (CUDA graph replays)"))
    width = max(6.0, 0.5 * table.index.get_level_values("shape").nunique() + 3)
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 5 * len(panels)), squeeze=False)
    for ax, (column, timed) in zip(axes[:, 0], panels):
        bar_chart(ax, by_shape_and_format(table, column), "speedup (best peer / tritonbn)",
                  f"tritonbn over the faster of eager and torch.compile, {timed}\n"
                  f"train_fwdbwd, BN + ReLU, {device_label(df)}")
        ax.axhline(1.0, color="black", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_copy_bandwidth(df: pd.DataFrame, path: Path) -> None:
    relu = relu_rows(df)
    relu = relu[relu.provider == "tritonbn"]
    modes = list(dict.fromkeys(relu["mode"]))
    width = max(6.0, 0.5 * relu["shape"].nunique() + 3)
    plt = pyplot()
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 4 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        wide = by_shape_and_format(relu[relu["mode"] == mode].set_index(CASE), "pct_copy_bw")
        bar_chart(ax, wide, "% of copy bandwidth (8-pass model)", f"tritonbn, {mode}, BN + ReLU")
    fig.suptitle(f"{device_label(df)}\ncopy bandwidth {df.copy_gbps.iloc[0]:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--modes", default="train_fwdbwd",
                        help="comma-separated modes for the markdown table")
    parser.add_argument("--query", help="pandas query selecting the table's rows, e.g. "
                                        "\"dtype == 'bf16' and layout != 'contiguous'\"")
    args = parser.parse_args(argv)
    df = pd.read_csv(args.csv)
    stem = args.csv.with_suffix("")
    if df.interpreter.any():
        print("INTERPRETER NUMBERS: these rows ran through Triton's interpreter on the CPU; "
              "no plots")
    else:
        for suffix, plot in (("-speedup.png", plot_speedup),
                             ("-copy-bw.png", plot_copy_bandwidth)):
            path = stem.with_name(stem.name + suffix)
            plot(df, path)
            print(f"wrote {path}")
    print(summary_table(df.query(args.query) if args.query else df, args.modes.split(",")))


if __name__ == "__main__":
    main()
