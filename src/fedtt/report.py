"""Run reports: results.json (the contract other tools read), Markdown tables and PNG curves.

One run -> ``write_results``; several runs of the same task (one per method) -> ``write_comparison``.
Plots use the Agg canvas directly (no pyplot, no global backend switch), fixed size and dpi.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FIGSIZE = (10.0, 4.0)  # inches
DPI = 110  # -> 1100 x 440 px

__all__ = ["write_results", "write_comparison", "format_bytes", "round_summary"]


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


def round_summary(entry: dict, total_rounds: int, cumulative_bytes: int) -> str:
    """One progress line per round, e.g.
    "round  3/10  acc 0.8123  loss 0.4312  train 0.5011  up 125.3 kB  down 125.3 kB  total 0.75 MB"."""
    width = len(str(total_rounds))
    ev = entry["eval"]
    return (f"round {entry['round']:>{width}}/{total_rounds}  "
            f"acc {ev['accuracy']:.4f}  loss {ev['loss']:.4f}  "
            f"train {_num(entry.get('train_loss'))}  up {format_bytes(entry['bytes_up'])}  "
            f"down {format_bytes(entry['bytes_down'])}  total {cumulative_bytes / 1e6:.2f} MB")


# ------------------------------------------------------------------------------------------------- helpers

def _label(results: dict) -> str:
    return results.get("label") or results["method"]


def _curve(results: dict) -> tuple[list[int], list[float], list[float]]:
    """(rounds, cumulative MB, accuracy), starting at round 0 / 0 MB with the initial accuracy if known."""
    rounds, mb, acc = [], [], []
    if results.get("initial"):
        rounds, mb, acc = [0], [0.0], [results["initial"]["accuracy"]]
    cum = 0
    for r in results["rounds"]:
        cum += r["bytes_up"] + r["bytes_down"]
        rounds.append(r["round"])
        mb.append(cum / 1e6)
        acc.append(r["eval"]["accuracy"])
    return rounds, mb, acc


def _plot(runs: list[dict], path: Path, title: str) -> None:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax_round, ax_mb = fig.subplots(1, 2)
    for res in runs:
        rounds, mb, acc = _curve(res)
        ax_round.plot(rounds, acc, marker="o", markersize=3, label=_label(res))
        ax_mb.plot(mb, acc, marker="o", markersize=3, label=_label(res))
    ax_round.set_xlabel("round")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_mb.set_xlabel("cumulative MB communicated (up + down)")
    ax_mb.set_xlim(left=0)
    for ax in (ax_round, ax_mb):
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    ax_mb.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed


def _json_safe(obj):
    """Plain JSON types; numpy/torch scalars and arrays unwrapped, non-finite floats -> null, Path -> str."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _json_safe(obj.tolist())
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # readers never see a half-written file
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _partition_text(partition: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in partition.items() if k != "kind")
    return f"{partition['kind']} ({extra})" if extra else partition["kind"]


# ------------------------------------------------------------------------------------------------- one run

def write_results(results: dict, out_dir: Path) -> None:
    """results.json, results.md and curves.png for one run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "results.json", json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")

    rows, cum = [], 0
    for r in results["rounds"]:
        cum += r["bytes_up"] + r["bytes_down"]
        rows.append([str(r["round"]), str(r["clients"]), _num(r.get("train_loss")),
                     f"{r['eval']['accuracy']:.4f}", f"{r['eval']['loss']:.4f}",
                     f"{r['params_up']:,}", f"{r['params_down']:,}",
                     f"{r['bytes_up'] / 1e3:.1f}", f"{r['bytes_down'] / 1e3:.1f}", _mb(cum)])
    best, final, initial = results["best"], results["final"], results.get("initial")
    head = [
        f"# {_label(results)}: {results['task']} on {results['model']}",
        "",
        f"- method: {results['method']}",
        f"- model: {results['model']}",
        f"- task: {results['task']}",
        f"- partition: {_partition_text(results['partition'])}, {results['num_clients']} clients, "
        f"{results['clients_per_round']} per round",
        f"- trainable params: {results['trainable_params']:,}",
    ]
    if initial:
        head.append(f"- initial accuracy: {initial['accuracy']:.4f}")
    head += [
        f"- best accuracy: {best['accuracy']:.4f} (round {best['round']})",
        f"- final accuracy: {final['accuracy']:.4f}",
        f"- total communicated: {_mb(results['total_bytes'])} MB",
        f"- wall time: {results['wall_seconds']:.1f} s",
        "",
    ]
    table = _md_table(["round", "clients", "train loss", "accuracy", "eval loss", "params up", "params down",
                       "kB up", "kB down", "cumulative MB"], rows)
    _write_text(out_dir / "results.md", "\n".join(head) + "\n" + table)
    _plot([results], out_dir / "curves.png",
          f"{_label(results)}: {results['task']} on {results['model']}")


# ------------------------------------------------------------------------------------------- several runs

RATIO_COLUMN = "x less traffic than LoRA"


def _comparison_rows(runs: list[dict]) -> list[dict]:
    lora = next((r for r in runs if r["method"] == "lora"), None)
    rows = []
    for res in runs:
        n = len(res["rounds"]) or 1
        params = sum(r["params_up"] + r["params_down"] for r in res["rounds"]) / n
        nbytes = sum(r["bytes_up"] + r["bytes_down"] for r in res["rounds"]) / n
        row = {
            "method": _label(res),
            "best accuracy (round)": f"{res['best']['accuracy']:.4f} ({res['best']['round']})",
            "final accuracy": f"{res['final']['accuracy']:.4f}",
            "trainable params": str(res["trainable_params"]),
            "params per round": str(round(params)),
            "bytes per round": str(round(nbytes)),
            "total MB": _mb(res["total_bytes"]),
            "wall seconds": f"{res['wall_seconds']:.1f}",
        }
        if lora is not None:
            row[RATIO_COLUMN] = (f"{lora['total_bytes'] / res['total_bytes']:.1f}"
                                 if res["total_bytes"] else "-")
        rows.append(row)
    return rows


def write_comparison(runs: list[dict], out_dir: Path) -> None:
    """comparison.csv, comparison.md and comparison.png for several runs (one per method)."""
    if not runs:
        raise ValueError("write_comparison needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _comparison_rows(runs)
    columns = list(rows[0])

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(out_dir / "comparison.csv", buf.getvalue())

    md_rows = []
    for row in rows:
        cells = dict(row)  # Markdown is for people: readable numbers
        cells["trainable params"] = f"{int(row['trainable params']):,}"
        cells["params per round"] = f"{int(row['params per round']):,}"
        cells["bytes per round"] = format_bytes(int(row["bytes per round"]))
        md_rows.append([cells[c] for c in columns])
    tasks = sorted({r["task"] for r in runs})
    models = sorted({r["model"] for r in runs})
    title = f"{', '.join(tasks)} on {', '.join(models)}"
    _write_text(out_dir / "comparison.md", f"# Comparison: {title}\n\n" + _md_table(columns, md_rows))
    _plot(runs, out_dir / "comparison.png", f"Comparison: {title}")
