"""``frontier``: accuracy against communication, each method over its own size knob.

Every point (a method at one size, on one wire dtype) runs on the same data, splits, seeds and budget as every
other, at its own learning rate chosen on validation at that size (``compare.search``'s default search: the rate
that works depends on the size, e.g. LoRA's at rank 1). The rate is chosen at the first wire dtype and kept at the
others, which change only how the values sent are rounded.

Per point, over its seeds: the test metric at the validation-selected round, bytes per round, cumulative MB (the
whole run), and **MB to target**: the cumulative MB up to the first round whose *validation* metric reaches the
target, with the test metric reported at that round; a seed that never reaches it makes the point "not reached".
The target is ``fraction`` x the reference, and the reference is the best mean validation metric (at the selected
round) of any point of the sweep: it needs no run of its own and exists for any set of methods, where the
centralized LoRA ceiling would cost a tuned run per seed and may lie beyond every federated point. Choices and
target read validation only.

The Pareto set: the points that no other point dominates (at least as good a test metric at the selected round
for at most as many bytes per round, better in one). Every point runs the same rounds, so bytes per round and
cumulative MB order the points alike.
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .compare import LR_KEY, TUNED_FILE, compare, dir_name, read_tuned, search, spec_overrides, tuning_line
from .config import load_config
from .files import atomic_write
from .report import DPI, FIGSIZE, format_bytes, format_mean_std, md_table, mean_and_std

# method spec -> (its size knob, the values swept); (IA)^3 has no knob: one point. FedTT+ runs its default
# (adaptive) policy with at most 1, 2 or all (0) factor groups per round. `--quick` sweeps the first two.
SIZES: dict[str, tuple[str | None, tuple]] = {
    "lora": ("adapter.rank", (1, 2, 4, 8, 16)),
    "ffa-lora": ("adapter.rank", (1, 2, 4, 8, 16)),
    "fedtt": ("adapter.rank", (2, 3, 5, 8)),
    "fedtt+": ("freezing.max_groups", (1, 2, 0)),
    "vera": ("adapter.rank", (256, 1024)),
    "ia3": (None, (None,)),
    "fed-sb": ("adapter.rank", (8, 32, 128)),
}
WIRE_KEY, WIRE_DTYPES = "federation.wire_dtype", ("float32", "float16")
TARGET_FRACTION = 0.95


def frontier(config_path: str | None, overrides: list[str], methods: list[str], out_dir: str | Path,
             quick: bool = False, overwrite: bool = False, seeds: list[int] = (0,), resume: bool = False,
             sizes: dict[str, list[str]] | None = None, wire_dtypes: list[str] | None = None,
             fraction: float = TARGET_FRACTION, tune_lr: bool = True, tune_seeds: int = 0,
             tuned_dir: str | Path | None = None) -> list[dict]:
    """Every method at each of its sizes (``sizes`` replaces a method's values) and wire dtypes (default: both;
    ``quick``: float32); writes frontier.{md,csv,png} and returns the table's rows.

    ``tuned_dir``: an earlier frontier's ``--out`` (e.g. at a cheaper budget) whose search chose each point's
    rate; a point it has no search for runs at its method's own rate. No search runs."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--target {fraction}: the target is a fraction of the reference; use a value in (0, 1]")
    out_dir, seeds = Path(out_dir), list(seeds)
    wire_dtypes = list(wire_dtypes or WIRE_DTYPES[: 1 if quick else None])
    sweep = {"quick": quick, "overwrite": overwrite, "seeds": seeds, "resume": resume, "tune_seeds": tune_seeds}
    plan = _plan(methods, sizes or {}, quick)
    for (spec, size), wire in itertools.product(plan, wire_dtypes):  # all validated before the first run starts
        load_config(config_path, spec_overrides(config_path, [*overrides, *size, f"{WIRE_KEY}={wire}"], spec, quick))
    points = []
    for spec, size in plan:
        where = out_dir / dir_name(spec) / (_size_name(size) or "default")
        first, *others = wire_dtypes
        shared = [*overrides, *size]
        print(f"=== frontier: {spec} {_size_name(size)} ===", flush=True)
        if tuned_dir is None:
            runs, tuning = _runs_at_best_rate(config_path, [*shared, f"{WIRE_KEY}={first}"], spec, where / first,
                                              tune_lr, sweep)
            lr = next(row["assignment"] for row in tuning if row["chosen"]) if tuning else []
        else:
            lr, tuning = _earlier_choice(Path(tuned_dir) / where.relative_to(out_dir) / first, spec)
            runs = compare(config_path, [*shared, *lr, f"{WIRE_KEY}={first}"], [spec], where / first,
                           tune_lr=False, **sweep)
        points.append(_point(config_path, [*shared, *lr], spec, size, first, runs, tuning, quick))
        for wire in others:
            runs = compare(config_path, [*shared, *lr, f"{WIRE_KEY}={wire}"], [spec], where / wire, tune_lr=False,
                           **sweep)
            points.append(_point(config_path, [*shared, *lr], spec, size, wire, runs, [], quick))
    return write_frontier(points, out_dir, fraction)


def _plan(methods: list[str], sizes: dict[str, list[str]], quick: bool) -> list[tuple[str, list[str]]]:
    """(method spec, its size overrides) of every point, in order."""
    unknown = [m for m in [*methods, *sizes] if m not in SIZES]
    if unknown:
        raise ValueError(f"frontier has no size knob for {unknown[0]!r}; its methods: {', '.join(SIZES)}")
    if not methods:
        raise ValueError(f"give at least one method: {', '.join(SIZES)}")
    plan = []
    for spec in methods:
        key, values = SIZES[spec]
        if key is None and spec in sizes:
            raise ValueError(f"--sizes {spec}=...: {spec} has no size knob")
        values = sizes.get(spec) or values[: 2 if quick else None]
        plan += [(spec, [f"{key}={value}"] if key else []) for value in values]
    return plan


def _size_name(size: list[str]) -> str:
    """``["adapter.rank=8"]`` -> ``"rank=8"``; no knob -> ``""``."""
    return "".join(f"{key.split('.')[-1]}={value}" for key, _, value in (a.partition("=") for a in size))


def _runs_at_best_rate(config_path, overrides, spec, out_dir: Path, tune_lr: bool, sweep: dict):
    """The point's runs at its learning rate chosen on validation, and the search's rows; without ``tune_lr``: its
    runs at the method's own rate, and no rows."""
    if not tune_lr:
        return compare(config_path, overrides, [spec], out_dir, tune_lr=False, **sweep), []
    table, _ = search(config_path, overrides, [spec], None, out_dir, **sweep)
    return next(row["runs"] for row in table if row["chosen"]), table


def _earlier_choice(search_dir: Path, spec: str) -> tuple[list[str], list[dict] | str]:
    """The rate an earlier search in ``search_dir`` chose for ``spec`` and where it came from; none there: the
    method's own rate."""
    if not (search_dir / TUNED_FILE).is_file():
        return [], f"its method's own rate ({search_dir} holds no search for this point)"
    chosen = read_tuned(search_dir)[spec]
    return chosen, f"chose {' '.join(chosen)} in an earlier search ({search_dir / 'tune.md'})"


def _point(config_path, overrides, spec, size, wire, runs, tuning, quick) -> dict:
    """A point before its target is known: what it is, its runs, its rate and what choosing the rate cost."""
    config = load_config(config_path, spec_overrides(config_path, overrides, spec, quick))
    return {"method": spec, "size": _size_name(size) or "-", "wire": wire,
            "lr": config.federation.lr, "runs": runs, "tuning": tuning}


# ----------------------------------------------------------------------------------------------- metrics

def to_target(results: dict, target: float) -> tuple[float, float] | None:
    """(cumulative MB, test metric) at the first round whose *validation* metric reaches ``target``; None when no
    round does. Round 0 (the backbone, nothing sent yet) counts at 0 MB; rounds without an evaluation
    (``federation.eval_every``) are passed over, their bytes counted."""
    metric, higher = results["selection"]["metric"], results["selection"]["higher_is_better"]
    initial, total = results.get("initial"), 0
    steps = [(0, initial["validation"], initial["test"])] if initial else []
    for entry in results["rounds"]:
        total += entry["bytes_up"] + entry["bytes_down"]
        if "validation" in entry:
            steps.append((total, entry["validation"], entry["eval"]))
    for sent, validation, test in steps:
        if validation[metric] >= target if higher else validation[metric] <= target:
            return sent / 1e6, test[metric]
    return None


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For each (quality, cost), higher quality and lower cost better: whether no other point has at least its
    quality at most its cost, and is better in one."""
    return [not any(q >= quality and c <= cost and (q, c) != (quality, cost) for q, c in points)
            for quality, cost in points]


def _search(point: dict) -> list[dict]:
    """The rows of the search this sweep ran for ``point`` (none when its rate came from elsewhere)."""
    return [] if isinstance(point["tuning"], str) else point["tuning"]


def frontier_rows(points: list[dict], fraction: float) -> tuple[list[dict], float, float]:
    """The table's rows (numbers as numbers), the reference and the target."""
    selection = points[0]["runs"][0]["selection"]
    metric, higher = selection["metric"], selection["higher_is_better"]
    rows = []
    for point in points:
        runs = point["runs"]
        test, test_std = mean_and_std([r["selected"]["test"][metric] for r in runs])
        rows.append({"method": point["method"], "size": point["size"], "wire": point["wire"], "lr": point["lr"],
                     "n": len(runs), "metric": metric, "test_selected_mean": test, "test_selected_std": test_std,
                     "validation_selected_mean": statistics.fmean(r["selected"]["validation"][metric] for r in runs),
                     "bytes_per_round": statistics.fmean(r["total_bytes"] / len(r["rounds"]) for r in runs),
                     "cumulative_mb": statistics.fmean(r["total_bytes"] for r in runs) / 1e6,
                     "tuning_runs": sum(row["n"] for row in _search(point)),
                     "tuning_seconds": sum(row["seconds"] for row in _search(point))})
    reference = (max if higher else min)(row["validation_selected_mean"] for row in rows)
    target = reference * fraction if higher else reference / fraction
    for row, point in zip(rows, points):
        reached = [hit for hit in (to_target(r, target) for r in point["runs"]) if hit is not None]
        row["reached"] = len(reached)  # seeds; MB to target only when every seed got there
        every = len(reached) == row["n"]
        for key, values in (("mb_to_target", [mb for mb, _ in reached]), ("test_at_target", [t for _, t in reached])):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_and_std(values) if every else (None, None)
    sign = 1 if higher else -1
    for row, front in zip(rows, pareto([(sign * r["test_selected_mean"], r["bytes_per_round"]) for r in rows])):
        row["pareto"] = front
    return rows, reference, target


# ----------------------------------------------------------------------------------------------- outputs

def write_frontier(points: list[dict], out_dir: Path, fraction: float = TARGET_FRACTION) -> list[dict]:
    """frontier.csv, frontier.md and frontier.png; returns the rows."""
    if not points:
        raise ValueError("write_frontier needs at least one point")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, reference, target = frontier_rows(points, fraction)
    text = f"{target:.4f}, {fraction:g} of the reference {reference:.4f}"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    atomic_write(out_dir / "frontier.csv", buf.getvalue())
    runs = points[0]["runs"][0]
    title = f"{runs['task']} on {runs['model']}"
    atomic_write(out_dir / "frontier.md", _markdown(rows, points, text, title))
    _plot(rows, out_dir / "frontier.png", f"Frontier: {title}")
    return rows


def _markdown(rows: list[dict], points: list[dict], target: str, title: str) -> str:
    metric = rows[0]["metric"]
    header = ["method", "size", "wire", "lr", "n", f"test {metric} @ selected", f"val {metric} @ selected",
              "bytes per round", "cumulative MB", "MB to target", f"test {metric} @ target", "tuning runs",
              "tuning s", "Pareto"]
    cells = []
    for row in rows:
        to_target = (format_mean_std(row, "mb_to_target", ".3f") if row["mb_to_target_mean"] is not None else
                     f"not reached ({row['reached']} of {row['n']} seeds did)" if row["reached"] else "not reached")
        cells.append([row["method"], row["size"], row["wire"], f"{row['lr']:.3g}", str(row["n"]),
                      format_mean_std(row, "test_selected"), f"{row['validation_selected_mean']:.4f}",
                      format_bytes(round(row["bytes_per_round"])), f"{row['cumulative_mb']:.3f}", to_target,
                      format_mean_std(row, "test_at_target"), str(row["tuning_runs"]), f"{row['tuning_seconds']:.0f}",
                      "**yes**" if row["pareto"] else ""])
    tuning = [f"- {p['method']} {p['size']} {p['wire']}: "
              + (p["tuning"] if isinstance(p["tuning"], str) else tuning_line(p["tuning"], [LR_KEY]))
              for p in points if p["tuning"]] or ["- none: every point ran at its method's own rate (--no-tune)"]
    front = ", ".join(f"{r['method']} {r['size']} {r['wire']}" for r in rows if r["pareto"])
    return (f"# Frontier: {title}\n\n"
            f"Target: validation {metric} {target}, the best mean validation {metric} (at the selected round) of any "
            f"point. MB to target: cumulative MB up to the first round whose validation {metric} reaches it (mean over "
            f"seeds; 'not reached' unless every seed does); test {metric} reported at that round.\n\n"
            f"Pareto set (test {metric} @ selected against bytes per round): {front}.\n\n"
            + md_table(header, cells) + "\nLearning rates chosen on validation, per point:\n\n" + "\n".join(tuning)
            + "\n")


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Test metric at the selected round (mean +- std over seeds) against MB per round and cumulative MB, log x;
    one line per method and wire dtype, the Pareto set ringed."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lines.setdefault((row["method"], row["wire"]), []).append(row)
    wires = list(dict.fromkeys(row["wire"] for row in rows))
    for ax, key, scale, label in ((axes[0], "bytes_per_round", 1e6, "MB per round (up + down, all clients)"),
                                  (axes[1], "cumulative_mb", 1.0, "cumulative MB (the whole run)")):
        for (method, wire), members in lines.items():
            members = sorted(members, key=lambda r: r[key])
            ax.errorbar([r[key] / scale for r in members], [r["test_selected_mean"] for r in members],
                        yerr=[r["test_selected_std"] for r in members], marker="o", markersize=4, capsize=3,
                        linestyle="-" if wire == wires[0] else "--",
                        label=method if len(wires) == 1 else f"{method} ({wire})")
        front = [r for r in rows if r["pareto"]]
        ax.scatter([r[key] / scale for r in front], [r["test_selected_mean"] for r in front], s=140,
                   facecolors="none", edgecolors="black", label="Pareto set", zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a span under a decade labels every minor tick: they overlap
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {rows[0]['metric']} @ selected round")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")  # fixed pixel size, written atomically as every output is
    atomic_write(path, buffer.getvalue())
