"""The benchmark's charts, drawn from the raw samples ``python -m bench`` and ``python -m bench.soak`` wrote.

    python -m bench.plots [--quick]      (make bench runs it last)

Reads ``bench.json``, ``fan_out.json`` (``python -m bench.fanout --results``) and ``soak.json`` from ``bench/results/`` (``bench/results/quick/`` with ``--quick``)
and writes PNGs to ``docs/img/`` (next to the quick results with ``--quick``, so the docs keep a full run's):

- ``first_log_latency.png``: how long after the step started Dagster recorded the function's first log line,
  for ours, the earlier design (10 s and 1 s chunks) and the floor, with the raw emulator round trip;
- ``fan_out.png``: a fan-out's wall time, the orchestrator's CPU time (total and per shard) and its peak
  threads and resident memory against its number of shards;
- ``soak_latency.png``: the chaos soak's session latency, without faults and with each kind of fault.

A missing results file skips its charts, saying so.
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib import ticker

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DOCS_IMG = BENCH.parent / "docs" / "img"


def results_dir(quick: bool) -> Path:
    """Where a run's raw samples go by default: a quick run never overwrites a full one's."""
    return RESULTS / "quick" if quick else RESULTS


def ecdf(axis: Any, values: Sequence[float], label: str, **style: Any) -> None:
    """The share of samples at or below each value: every sample shows, the median where it crosses 0.5."""
    ordered = sorted(values)
    axis.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=f"{label} (n={len(ordered)})", **style)


def log_scale(axis: Any, which: str) -> None:
    """A log axis ticked at 1, 2, 3 and 5 of each decade, with plain numbers (0.05, 2, 100) as labels."""
    getattr(axis, f"set_{which}scale")("log")
    scale = getattr(axis, f"{which}axis")
    scale.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    scale.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    scale.set_minor_formatter(ticker.NullFormatter())


def first_log_chart(bench: dict[str, Any], out: Path) -> Path:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, values in bench["first_log"].items():
        ecdf(axis, values, name, linewidth=2)
    ecdf(axis, bench["raw_round_trip"], "raw emulator publish → receive", linestyle=":", color="grey")
    log_scale(axis, "x")
    axis.set_xlabel("seconds from step start to the first log line in Dagster (log scale)")
    axis.set_ylabel("share of sessions")
    axis.set_title(f"First-log latency on the local stack ({bench['cores']} cores)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return save(figure, out / "first_log_latency.png")


def fan_out_chart(bench: dict[str, Any], out: Path) -> Path:
    rows = sorted(bench["fan_out"], key=lambda r: r["shards"])
    shards = [r["shards"] for r in rows]
    figure, (wall, cpu, footprint) = plt.subplots(1, 3, figsize=(14, 4))
    wall.plot(shards, [r["seconds"] for r in rows], marker="o")
    wall.set_ylabel("wall time, s")
    cpu.plot(shards, [r["cpu_seconds"] for r in rows], marker="o", color="tab:orange", label="total, s")
    cpu.plot(shards, [1000 * r["cpu_seconds"] / r["shards"] for r in rows], marker="s", color="tab:green", label="per shard, ms")
    cpu.set_ylabel("orchestrator CPU")
    cpu.legend(fontsize=8)
    for axis in (wall, cpu):
        log_scale(axis, "y")
    footprint.plot(shards, [r["threads"] for r in rows], marker="o", color="tab:purple", label="peak threads")
    footprint.plot(shards, [r["rss_mb"] for r in rows], marker="s", color="tab:brown", label="peak RSS, MB")
    footprint.set_ylim(bottom=0)
    footprint.set_ylabel("threads / MB (linear)")
    footprint.legend(fontsize=8)
    for axis in (wall, cpu, footprint):
        log_scale(axis, "x")
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0,)))  # 1, 10, ... 10,000: room for the labels
        axis.set_xlabel("shards in one fan-out step (log scale)")
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle("Fan-out (run_many, 100 at once) of trivial shards on the local stack, production-semantics layer on")
    return save(figure, out / "fan_out.png")


def soak_chart(soak: dict[str, Any], out: Path) -> Path:
    done = [s for s in soak["sessions"] if s["outcome"] == "succeeded"]
    calm = [s["seconds"] for s in done if not s["faults"]]
    figure, (curves, boxes) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ecdf(curves, calm, "without faults", linewidth=2)
    ecdf(curves, [s["seconds"] for s in done if s["faults"]], "with faults", linewidth=2)
    log_scale(curves, "x")
    curves.set_xlabel("session (step) latency, s (log scale)")
    curves.set_ylabel("share of succeeded sessions")
    curves.grid(True, which="both", alpha=0.3)
    curves.legend(fontsize=8, loc="lower right")
    kinds = sorted({fault for s in done for fault in s["faults"]})
    groups = [calm] + [[s["seconds"] for s in done if kind in s["faults"]] for kind in kinds]
    labels = ["none"] + kinds
    kept = [(g, label) for g, label in zip(groups, labels) if g]
    boxes.boxplot([g for g, _ in kept], tick_labels=[f"{label}\n(n={len(g)})" for g, label in kept], whis=(1, 99))
    log_scale(boxes, "y")
    boxes.set_ylabel("session latency, s (log scale)")
    boxes.tick_params(axis="x", labelsize=7)
    boxes.set_title("by fault that hit the session", fontsize=9)
    boxes.grid(True, axis="y", which="both", alpha=0.3)
    args, counts = soak["args"], soak["counts"]
    figure.suptitle(
        f"Chaos soak: {args['sessions']} sessions at {args['concurrency']} concurrent; {counts['succeeded']} succeeded, "
        f"{counts['failed_clear']} failed with a clear error, {counts['hung']} hung"
    )
    return save(figure, out / "soak_latency.png")


def save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="draw the quick runs' results, next to them")
    parser.add_argument("--results", type=Path, help="the folder of bench.json and soak.json")
    parser.add_argument("--out", type=Path, help="where the PNGs go")
    args = parser.parse_args()
    results = args.results or results_dir(args.quick)
    out = args.out or (results / "img" if args.quick else DOCS_IMG)
    out.mkdir(parents=True, exist_ok=True)
    charts = {"bench.json": (first_log_chart,), "fan_out.json": (fan_out_chart,), "soak.json": (soak_chart,)}
    for name, draws in charts.items():
        source = results / name
        if not source.exists():
            print(f"no {source}: its charts are skipped")
            continue
        data = json.loads(source.read_text())
        for draw in draws:
            print(f"wrote {draw(data, out)}")


if __name__ == "__main__":
    main()
