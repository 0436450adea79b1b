"""Run reports: results.json (the contract other tools read), Markdown tables and PNG curves.

One run -> ``write_results`` (the one writer of results.json: NaN-safe, atomic). Several runs of one task ->
``write_comparison``: runs with the same label are seeds of one method; tables give the mean, standard
deviation and n of the test metric at the validation-selected round and at the final round, and the plots
shade the spread. Plots use the Agg canvas directly (no pyplot, no global backend switch), fixed size and dpi.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import statistics
import subprocess
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import __version__
from .files import atomic_write

FIGSIZE = (10.0, 4.0)  # inches
DPI = 110  # -> 1100 x 440 px

__all__ = ["code_version", "format_bytes", "format_mean_std", "json_safe", "md_table", "mean_and_std", "round_summary",
           "summarize", "write_comparison", "write_results"]


# ---------------------------------------------------------------------------------------------- provenance

def code_version() -> dict:
    """The code that makes a run: fedtt's version and, when fedtt runs from a git checkout (an editable install),
    its commit and whether src/ differs from it. Kept runs outlive the code that made them (docs/results/), and
    a reused run must be told apart from one the current code would make."""
    return dict(_code_version())  # a copy, so that no caller can change the cached one


@functools.cache  # once per process: a process runs the code it imported, even if src/ changes under it
def _code_version() -> dict:
    version = {"fedtt": __version__}
    root = Path(__file__).resolve().parents[2]
    if not ((root / ".git").exists() and (root / "src" / "fedtt").is_dir()):
        return version
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on PATH, or not a repository after all
        return version
    return {**version, "commit": commit, "source_changed": bool(changed)}


# ---------------------------------------------------------------------------------------------- formatting

def format_bytes(n: int) -> str:
    """Decimal units: "812 B", "12.4 kB", "3.10 MB", "1.20 GB"."""
    if n < 0:
        raise ValueError(f"byte count must be >= 0, got {n}")
    if n < 1000:
        return f"{int(n)} B"
    for scale, unit, digits in ((1e3, "kB", 1), (1e6, "MB", 2)):
        if round(n / scale, digits) < 1000:  # 999_999 B is "1.00 MB", not "1000.0 kB"
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n / 1e9:.2f} GB"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def round_summary(entry: dict, total_rounds: int, cumulative_bytes: int, metric: str = "accuracy") -> str:
    """One progress line per round, e.g. "round  3/10  val accuracy 0.8010  test accuracy 0.8123  test loss
    0.4312  train 0.5011  up 125.3 kB  down 125.3 kB  total 0.75 MB" (and the largest epsilon under DP); "-" for
    the metrics of a round that was not evaluated (``federation.eval_every``)."""
    width = len(str(total_rounds))
    test, validation = entry.get("eval", {}), entry.get("validation", {})
    line = (f"round {entry['round']:>{width}}/{total_rounds}  val {metric} {_num(validation.get(metric))}  "
            f"test {metric} {_num(test.get(metric))}  test loss {_num(test.get('loss'))}  "
            f"train {_num(entry.get('train_loss'))}  up {format_bytes(entry['bytes_up'])}  "
            f"down {format_bytes(entry['bytes_down'])}  total {cumulative_bytes / 1e6:.2f} MB")
    if "epsilon_max" in entry:
        line += f"  epsilon {entry['epsilon_max']:.3f}"
    if entry.get("skipped"):
        line += f"  (not aggregated: {entry['skipped']})"
    return line


def epsilon_max(results: dict) -> float:
    """The run's largest client epsilon; results.json writes inf (clipping without noise) as null."""
    value = results["privacy"]["epsilon_max"]
    return math.inf if value is None else value


def json_safe(obj):
    """Plain JSON types; numpy/torch scalars and arrays unwrapped, non-finite floats -> null, Path -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return json_safe(obj.tolist())
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _partition_text(partition: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in partition.items() if k != "kind")
    return f"{partition['kind']} ({extra})" if extra else partition["kind"]


def _label(results: dict) -> str:
    return results.get("label") or results["method"]


def _metric(results: dict) -> str:
    return results.get("selection", {}).get("metric", "accuracy")


def _curve(results: dict, split: str = "eval") -> tuple[list[int], list[float], list[float]]:
    """(rounds, cumulative MB, metric on ``split``) of the evaluated rounds, from round 0 / 0 MB when the initial
    evaluation is known."""
    metric, rounds, mb, values = _metric(results), [], [], []
    initial = results.get("initial", {}).get("test" if split == "eval" else split)
    if initial and metric in initial:
        rounds, mb, values = [0], [0.0], [initial[metric]]
    cum = 0
    for r in results["rounds"]:
        cum += r["bytes_up"] + r["bytes_down"]
        if split in r:  # evaluated (federation.eval_every)
            rounds.append(r["round"])
            mb.append(cum / 1e6)
            values.append(r[split][metric])
    return rounds, mb, values


# ------------------------------------------------------------------------------------------------- one run

def write_results(results: dict, out_dir: Path, tables: bool = True) -> None:
    """results.json (and, with ``tables``, results.md and curves.png) for one run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.json", json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    if not tables:
        return
    metric = _metric(results)
    rows, cum = [], 0
    for r in results["rounds"]:
        cum += r["bytes_up"] + r["bytes_down"]
        rows.append([str(r["round"]), str(r["clients"]), _num(r.get("train_loss")),
                     _num(r.get("validation", {}).get(metric)), _num(r.get("eval", {}).get(metric)),
                     _num(r.get("eval", {}).get("loss")), f"{r['params_up']:,}", f"{r['params_down']:,}",
                     f"{r['bytes_up'] / 1e3:.1f}", f"{r['bytes_down'] / 1e3:.1f}", _mb(cum)])
    selected, final = results.get("selected"), results.get("final", {})
    head = [
        f"# {_label(results)}: {results['task']} on {results['model']}",
        "",
        f"- method: {results['method']}; seed {results['seed']}, data seed {results.get('data_seed', results['seed'])}",
        f"- partition: {_partition_text(results['partition'])}, {results['num_clients']} clients, "
        f"{results['clients_per_round']} per round",
        f"- trainable params: {results['trainable_params']:,}",
    ]
    if selected:
        head.append(f"- selected round (best validation {metric}): {selected['round']}; validation "
                    f"{selected['validation'][metric]:.4f}, test {selected['test'][metric]:.4f}")
    head += [
        f"- final round: test {metric} {final.get(metric, float('nan')):.4f}",
        f"- total communicated: {_mb(results['total_bytes'])} MB",
        f"- wall time: {results['wall_seconds']:.1f} s",
    ]
    if results.get("privacy", {}).get("epsilon"):
        p = results["privacy"]
        head.append(f"- privacy: epsilon {epsilon_max(results):.3f} (largest client, whole run) at delta "
                    f"{max(p['delta'].values()):g}, clipping {p['max_grad_norm']:g}, {p['accountant']} accountant")
    if results.get("status") == "failed":
        head.append(f"- FAILED: {results.get('error')}")
    table = md_table(["round", "clients", "train loss", f"val {metric}", f"test {metric}", "test loss", "params up",
                      "params down", "kB up", "kB down", "cumulative MB"], rows)
    atomic_write(out_dir / "results.md", "\n".join(head) + "\n\n" + table)
    if results["rounds"]:
        _plot([[results]], out_dir / "curves.png", f"{_label(results)}: {results['task']} on {results['model']}")


def _plot(groups: list[list[dict]], path: Path, title: str) -> None:
    """Test metric vs round and vs cumulative MB; several seeds of a method: their mean and a +-1 std band."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax_round, ax_mb = fig.subplots(1, 2)
    for runs in groups:
        curves = [_curve(r) for r in runs]
        length = min(len(c[0]) for c in curves)
        rounds = curves[0][0][:length]
        mb = [statistics.fmean(c[1][i] for c in curves) for i in range(length)]
        mean = [statistics.fmean(c[2][i] for c in curves) for i in range(length)]
        label = _label(runs[0]) + (f" (n={len(runs)})" if len(runs) > 1 else "")
        for ax, x in ((ax_round, rounds), (ax_mb, mb)):
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
            if len(runs) > 1:
                std = [statistics.stdev(c[2][i] for c in curves) for i in range(length)]
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
    ax_round.set_xlabel("round")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mb.set_xlabel("cumulative MB communicated (up + down)")
    ax_mb.set_xlim(left=0)
    metric = _metric(groups[0][0])
    for ax in (ax_round, ax_mb):
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    ax_mb.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays fixed
    atomic_write(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------- several runs

RATIO_COLUMN = "x less traffic than LoRA"
# A decoder comparison's other test measures, at the selected round: the held-out response loss and the
# accuracy by label likelihood (a labelled task's main metric is exact match of greedy generation).
DECODER_METRICS = ("loss", "label_accuracy")


def mean_and_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per method label (its runs are seeds): numbers as numbers, for CSV and tables."""
    groups: dict[str, list[dict]] = {}
    for res in runs:
        groups.setdefault(_label(res), []).append(res)
    federated_lora = [m for m in groups.values() if m[0]["method"] == "lora" and m[0]["num_clients"] > 1]
    lora = groups.get("lora") or next(iter(federated_lora), None)
    lora_bytes = statistics.fmean(r["total_bytes"] for r in lora) if lora else None
    rows = []
    for label, members in groups.items():
        metric = _metric(members[0])
        selected = [r["selected"]["test"][metric] for r in members if r.get("selected")]
        final = [r["final"][metric] for r in members if r.get("final")]
        validation = [r["selected"]["validation"][metric] for r in members if r.get("selected")]
        rounds = sum(len(r["rounds"]) for r in members) or 1
        params = sum(x["params_up"] + x["params_down"] for r in members for x in r["rounds"])
        nbytes = sum(x["bytes_up"] + x["bytes_down"] for r in members for x in r["rounds"])
        row = {"method": label, "metric": metric, "n": len(members),
               "test_selected_mean": mean_and_std(selected)[0] if selected else None,
               "test_selected_std": mean_and_std(selected)[1] if selected else None,
               "test_final_mean": mean_and_std(final)[0] if final else None,
               "test_final_std": mean_and_std(final)[1] if final else None,
               "validation_selected_mean": mean_and_std(validation)[0] if validation else None,
               "selected_rounds": " ".join(str(r["selected"]["round"]) for r in members if r.get("selected")),
               "trainable_params": members[0]["trainable_params"],
               "params_per_round": params / rounds, "bytes_per_round": nbytes / rounds,
               "total_mb": statistics.fmean(r["total_bytes"] for r in members) / 1e6,
               "wall_seconds": statistics.fmean(r["wall_seconds"] for r in members)}
        for key in DECODER_METRICS if members[0].get("kind") == "instruction" else ():
            values = [r["selected"]["test"][key] for r in members if key in r.get("selected", {}).get("test", {})]
            if values and key != metric:
                row[f"test_{key}_selected_mean"], row[f"test_{key}_selected_std"] = mean_and_std(values)
        if any(r.get("privacy", {}).get("epsilon") for r in members):
            row["epsilon_max"] = max(epsilon_max(r) for r in members)
        if lora_bytes is not None:
            total = statistics.fmean(r["total_bytes"] for r in members)
            row[RATIO_COLUMN] = lora_bytes / total if total else None
        rows.append(row)
    return rows


def format_mean_std(row: dict, key: str, fmt: str = ".4f") -> str:
    """``row[key_mean] ± row[key_std]`` ("-" when there is no mean; the mean alone for one seed)."""
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if mean is None:
        return "-"
    return f"{mean:{fmt}} ± {std:{fmt}}" if row["n"] > 1 else f"{mean:{fmt}}"


def write_comparison(runs: list[dict], out_dir: Path) -> list[dict]:
    """comparison.csv, comparison.md and comparison.png for several runs (one label per method, seeds pooled)."""
    if not runs:
        raise ValueError("write_comparison needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if row.get(k) is None else row.get(k, "")) for k in columns} for row in rows])
    atomic_write(out_dir / "comparison.csv", buf.getvalue())

    metric = rows[0]["metric"]
    header = ["method", "n", f"test {metric} @ selected", f"test {metric} final", f"val {metric} @ selected",
              "selected round", "trainable params", "params per round", "bytes per round", "total MB",
              "wall seconds"]
    extras = [key for key in DECODER_METRICS if any(f"test_{key}_selected_mean" in r for r in rows)]
    header += [f"test {key} @ selected" for key in extras]
    has_epsilon = any("epsilon_max" in r for r in rows)
    has_ratio = RATIO_COLUMN in columns
    header += (["epsilon (max)"] if has_epsilon else []) + ([RATIO_COLUMN] if has_ratio else [])
    md_rows = []
    for row in rows:
        cells = [row["method"], str(row["n"]), format_mean_std(row, "test_selected"),
                 format_mean_std(row, "test_final"), _num(row["validation_selected_mean"]), row["selected_rounds"],
                 f"{row['trainable_params']:,}", f"{round(row['params_per_round']):,}",
                 format_bytes(round(row["bytes_per_round"])),
                 f"{row['total_mb']:.3f}", f"{row['wall_seconds']:.1f}"]
        cells += [format_mean_std(row, f"test_{key}_selected") if f"test_{key}_selected_mean" in row else "-"
                  for key in extras]
        cells += [_num(row.get("epsilon_max"), ".2f")] if has_epsilon else []
        cells += [_num(row.get(RATIO_COLUMN), ".1f")] if has_ratio else []
        md_rows.append(cells)
    tasks = sorted({r["task"] for r in runs})
    models = sorted({r["model"] for r in runs})
    title = f"{', '.join(tasks)} on {', '.join(models)}"
    atomic_write(out_dir / "comparison.md", f"# Comparison: {title}\n\n" + md_table(header, md_rows))
    groups: dict[str, list[dict]] = {}
    for res in runs:
        groups.setdefault(_label(res), []).append(res)
    _plot(list(groups.values()), out_dir / "comparison.png", f"Comparison: {title}")
    return rows
