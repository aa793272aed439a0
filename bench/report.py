"""Results: ratios against reference, the stdout table, the JSON file and the log-log plots."""

from __future__ import annotations

import json
from pathlib import Path

MODES = ("fwd", "fwd+bwd")


def add_ratios(results: list[dict], matmul_tflops: float | None) -> None:
    """Add each result's speedup and memory ratio against `reference` on the same workload and mode,
    and its fraction of the measured dense matmul throughput."""
    reference = {
        (r["workload"]["name"], r["tokens"], r["mode"]): r
        for r in results
        if r["provider"] == "reference" and "time_ms" in r
    }
    for result in results:
        if "time_ms" not in result:
            continue
        if matmul_tflops:
            result["matmul_fraction"] = result["tflops"] / matmul_tflops
        baseline = reference.get((result["workload"]["name"], result["tokens"], result["mode"]))
        if baseline is None:
            continue
        result["speedup_vs_reference"] = baseline["time_ms"]["median"] / result["time_ms"]["median"]
        if result.get("peak_bytes") and baseline.get("peak_bytes"):
            result["memory_vs_reference"] = result["peak_bytes"] / baseline["peak_bytes"]


def _check_cell(result: dict) -> str:
    check = result.get("check")
    if check is None:
        return "-"
    if check["passed"] is None:
        return "skipped"
    verdict = "ok" if check["passed"] else "FAIL"
    sliced = "" if check["workload"] == result["workload"] else " (slice)"
    return f"{verdict} {check['error']:.1e}{sliced}"


def _ms(milliseconds: float) -> str:
    return f"{milliseconds:.0f}" if milliseconds >= 100 else f"{milliseconds:.3g}"


def _row(result: dict) -> list[str]:
    workload = result["workload"]
    cells = [workload["name"], str(result["tokens"]), result["mode"], result["provider"]]
    if "time_ms" not in result:
        status = result["status"] + (f": {result['note']}" if result["note"] else "")
        return cells + [status] + [""] * 6 + [_check_cell(result)]
    time_ms = result["time_ms"]
    peak_mib = result["peak_bytes"] / 2**20
    cells += [
        result["status"],
        f"{_ms(time_ms['median'])} [{_ms(time_ms['q25'])}, {_ms(time_ms['q75'])}]",
        f"{result['speedup_vs_reference']:.3g}x" if "speedup_vs_reference" in result else "-",
        f"{result['tflops']:.3g}",
        f"{100 * result['matmul_fraction']:.1f}%" if "matmul_fraction" in result else "-",
        f"{peak_mib:.1f}",
        f"{result['peak_bytes'] / result['input_bytes']:.2f}",
        _check_cell(result),
    ]
    return cells


HEADER = [
    "workload", "N", "mode", "provider", "status", "time ms median [IQR]", "vs ref", "TFLOP/s",
    "% matmul", "peak MiB", "peak/in", "check",
]  # fmt: skip


def format_table(results: list[dict]) -> str:
    """A fixed-width table, one row per result; unavailable/OOM/skipped rows carry their reason."""
    rows = [_row(r) for r in results]
    timed = [row for row in rows if row[5]]
    widths = [max(len(row[i]) for row in [HEADER, *timed]) for i in range(len(HEADER))]

    def line(row: list[str]) -> str:
        if not row[5]:  # no timing: the status cell spans the figure columns
            return "  ".join([*(c.ljust(w) for c, w in zip(row[:4], widths)), row[4], row[-1]]).rstrip()
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(HEADER), separator, *(line(row) for row in rows)])


def write_json(path: Path, meta: dict, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


def plot(results: list[dict], prefix: Path, title: str) -> list[Path]:
    """`{prefix}-time.png` and `{prefix}-memory.png`: median time and peak memory against N, log-log,
    one line per provider, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    providers = list(dict.fromkeys(r["provider"] for r in results))
    figures = {
        "time": ("median time (ms)", lambda r: r["time_ms"]["median"]),
        "memory": ("peak memory above inputs (MiB)", lambda r: r["peak_bytes"] / 2**20),
    }
    paths = []
    for kind, (ylabel, value) in figures.items():
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for provider in providers:
                points = sorted(
                    (r["tokens"], value(r))
                    for r in results
                    if r["mode"] == mode and r["provider"] == provider and "time_ms" in r and value(r) > 0
                )
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N = frames x HW")
            ax.set_ylabel(ylabel)
            ax.set_title(mode)
            ax.margins(0.15)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        path = prefix.with_name(f"{prefix.name}-{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
