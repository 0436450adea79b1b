"""``compare`` and ``tune``: several methods on one config (same data, splits, budget), side by side, over seeds.

Method specs: ``fedtt``, ``fedtt+`` (default policy) or ``fedtt+:<policy>`` (fixed, cyclic, adaptive), any other
method of ``fedtt.config.METHODS`` (``lora``, ``ffa-lora``, ``vera``, ``ia3``, ``fed-sb``), and ``centralized``
(= ``centralized:fedtt``) or ``centralized:<adapter method>``: that method with one client holding all the
training data, trained for ``num_clients x local_steps`` steps per round so it does the same work per round: the
reference ceiling. Each method starts from its own defaults (``fedtt.defaults``) unless the config or ``--set``
fixes a key for all, or a tuning result (``--tuned``) gives its chosen values.

``tune`` runs a grid of values per method over seeds and picks, per method, the values with the best mean
*validation* metric, at each run's validation-selected round or (``by="final"``) at its final round, whose adapter
is the one a run saves; test numbers are never read. Without a grid it searches each method's learning rate
around the method's own (``adaptive_lr``): the search ``compare`` runs by default, so that a comparison on a
user's data is tuned on that data (defaults chosen on one task can reverse a comparison on another).

With ``resume``, a sweep that was killed continues: a run that finished with the same config is reused, a run
that stopped part-way is resumed from its checkpoint, and only the rest start afresh.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

from .adapters import METHODS as ADAPTER_METHODS
from .config import POLICIES, Config, load_config
from .federated.checkpoint import FILE as CHECKPOINT
from .federated.checkpoint import check_same_run
from .files import atomic_write
from .report import code_version, write_comparison
from .run import run

DEFAULT_METHODS = ("fedtt", "fedtt+", "lora", "ffa-lora", "centralized")
# A few-minute look per method on 2 CPU cores: 5 rounds, short sequences, 500 validation and test examples.
# (Truncating MiniLM to 2 layers is faster but learns Rotten Tomatoes too slowly to tell methods apart.)
# A constant learning rate: the methods' rates were chosen with it at 5 rounds (docs/results.md), and decaying
# over 5 rounds starves FedTT, which needs two or three full-rate rounds to leave the majority class.
QUICK = ("model.max_length=48", "federation.rounds=5", "task.max_eval_examples=500",
         "federation.lr_schedule=constant")
TUNED_FILE = "tuned.json"
LR_KEY = "federation.lr"
# The default search: each method's own rate (its package default, or the config's) x 1/3, 1 and 3; while the
# best rate is at an edge, the next rate past it (x 1/9, x 9, ...), at most LR_EXTENSIONS times. Every method gets
# the same search, 3 to 5 rates; a step of 3 is about two per decade, as the defaults' grids had.
LR_STEP, LR_EXTENSIONS = 3.0, 2


def method_overrides(spec: str, base_clients: int, base_steps: int) -> list[str]:
    method, _, option = spec.partition(":")
    if method == "centralized":
        inner = option or "fedtt"
        if inner not in ADAPTER_METHODS:
            raise ValueError(f"method spec {spec!r} is not valid; centralized runs one of {', '.join(ADAPTER_METHODS)}")
        return [f"method={inner}", "federation.num_clients=1", "federation.clients_per_round=0",
                "federation.partition=iid", "federation.min_replies=1",
                f"federation.local_steps={base_clients * base_steps}"]
    if option and (method != "fedtt+" or option not in POLICIES):
        raise ValueError(f"method spec {spec!r} is not valid; policies go with fedtt+ only: "
                         f"{', '.join('fedtt+:' + p for p in POLICIES)}")
    return [f"method={method}"] + ([f"freezing.policy={option}"] if option else [])


def dir_name(spec: str) -> str:
    """A method spec (``fedtt+:cyclic``) as a directory name (``fedttplus-cyclic``)."""
    return spec.replace(":", "-").replace("+", "plus")


def run_dir(out_dir: Path, spec: str, seed: int) -> Path:
    # one layout for any number of seeds: a search that tuned on the first seed then finds that run in place
    return out_dir / dir_name(spec) / f"seed-{seed}"


def run_or_continue(config: Config, out_dir: Path, overwrite: bool, resume: bool) -> dict:
    """``run``, except that with ``resume`` a finished run of this config is reused and a stopped one resumed."""
    if resume:
        finished = finished_run(config, out_dir)
        if finished is not None:
            print(f"reusing the finished run in {out_dir}{code_note(finished)}", flush=True)
            return finished
        if (out_dir / CHECKPOINT).is_file():
            return run(config, out_dir, resume=True)
    return run(config, out_dir, overwrite=overwrite or resume)


def code_note(results: dict) -> str:
    """Empty when the current code made (some of) the run; else which code made it, so nobody mistakes a kept
    run for one of this code."""
    codes, current = results.get("code", []), code_version()
    if current in codes:
        return ""
    made_by = ", ".join(describe(code) for code in codes) or "an earlier fedtt that did not record its code"
    return f" (made by {made_by}; this is {describe(current)}: --overwrite runs it again)"


def describe(code: dict) -> str:
    text = f"fedtt {code['fedtt']}"
    if code.get("commit"):
        text += f" at {code['commit'][:10]}" + (" with changed sources" if code.get("source_changed") else "")
    return text


def finished_run(config: Config, out_dir: Path) -> dict | None:
    """results.json of the finished run of ``config`` in ``out_dir``; None when there is none to reuse.

    A finished run is recognised by its results.json and config.toml alone, without its checkpoint: the sweeps
    behind docs/results.md keep only those two files of each run in git (docs/results/), so a section that
    stopped part-way continues on another machine. Raises when ``out_dir`` holds a run of another config, or one
    with another number of rounds and no checkpoint to continue it from."""
    results_path, config_path = out_dir / "results.json", out_dir / "config.toml"
    if not (results_path.is_file() and config_path.is_file()):
        return None
    results = json.loads(results_path.read_text())
    if results.get("status") != "finished":
        return None
    saved = load_config(config_path)
    check_same_run(saved.model_dump(mode="json"), config, out_dir)
    if saved.federation.rounds == config.federation.rounds:
        return results
    if not (out_dir / CHECKPOINT).is_file():
        raise ValueError(f"cannot resume {out_dir}: its run finished {saved.federation.rounds} rounds and has no "
                         f"{CHECKPOINT} to continue from; start it again with --overwrite")
    return None  # the checkpoint continues it to config's rounds


def spec_overrides(config_path: str | None, overrides: list[str], spec: str, quick: bool) -> list[str]:
    """The overrides that run a method spec on this config: the quick profile, the caller's, then the spec's."""
    shared = [*(QUICK if quick else ()), *overrides]
    base = load_config(config_path, shared)
    return shared + method_overrides(spec, base.federation.num_clients, base.federation.local_steps)


def compare(config_path: str | None, overrides: list[str], methods: list[str], out_dir: str | Path,
            quick: bool = False, overwrite: bool = False, seeds: list[int] = (0,),
            tuned: dict[str, list[str]] | None = None, resume: bool = False, tune_lr: bool = True,
            tune_seeds: int = 0) -> list[dict]:
    """Every method on every seed; writes comparison.{md,csv,png} and returns the runs' results.

    Unless ``tuned`` gives each method's values (an earlier ``tune``) or ``tune_lr`` is False, each method's
    learning rate is first chosen on validation (``tune`` without a grid, written to ``out_dir/tune``, on the first
    ``tune_seeds`` seeds; 0: all), and the runs compared are the search's runs at the chosen rate: nothing runs
    twice."""
    out_dir, seeds = Path(out_dir), list(seeds)
    sweep = {"quick": quick, "overwrite": overwrite, "seeds": seeds, "resume": resume}
    plans = {}
    for spec in methods:  # every config is validated before the first run starts
        extra = spec_overrides(config_path, overrides, spec, quick) + (tuned or {}).get(spec, [])
        for seed in seeds:
            plans[spec, seed] = load_config(config_path, extra + [f"seed={seed}"])
    if tuned is None and tune_lr:
        table, _ = search(config_path, overrides, methods, None, out_dir / "tune", tune_seeds=tune_seeds, **sweep)
        runs = [results for row in table if row["chosen"] for results in row["runs"]]
        write_comparison(runs, out_dir)
        summary = "\n".join(tuning_summary(table, [LR_KEY]))
        atomic_write(out_dir / "comparison.md", (out_dir / "comparison.md").read_text() +
                     f"\nLearning rates chosen on validation (every run: {out_dir / 'tune'}):\n\n{summary}\n")
        print(summary, flush=True)
        return runs
    runs = []
    for (spec, seed), config in plans.items():
        print(f"== {spec} (seed {seed}) ==", flush=True)
        results = run_or_continue(config, run_dir(out_dir, spec, seed), overwrite, resume)
        runs.append({**results, "label": spec})
    write_comparison(runs, out_dir)
    return runs


def parse_grid(assignments: list[str], option: str = "--grid", example: str = "federation.lr=1e-3,3e-3"
               ) -> dict[str, list[str]]:
    """``["federation.lr=1e-3,3e-3", ...]`` -> ``{"federation.lr": ["1e-3", "3e-3"]}``."""
    grid = {}
    for assignment in assignments:
        key, sep, values = assignment.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"{option} {assignment!r} is not of the form key=v1,v2,... (e.g. {example})")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def tune(config_path: str | None, overrides: list[str], methods: list[str], grid: dict[str, list[str]] | None,
         out_dir: str | Path, quick: bool = False, overwrite: bool = False, seeds: list[int] = (0,),
         resume: bool = False, by: str = "selected", tune_seeds: int = 0) -> dict:
    """For each method, every grid point (no grid: ``adaptive_lr`` around the method's rate) on every seed; the
    chosen point per method is the one with the best mean validation metric at each run's validation-selected
    round (``by="selected"``) or at its final round (``by="final"``). Writes tune.md, tune.csv (both means, the
    cost) and tuned.json; returns each method's chosen ``key=value``s."""
    return search(config_path, overrides, methods, grid, out_dir, by, tune_seeds, quick=quick, overwrite=overwrite,
                  seeds=seeds, resume=resume)[1]


def search(config_path: str | None, overrides: list[str], methods: list[str], grid: dict[str, list[str]] | None,
           out_dir: str | Path, by: str = "selected", tune_seeds: int = 0, **sweep) -> tuple[list[dict], dict]:
    """``tune``, returning its table too: a row per grid point with its runs (``"runs"``) and ``"chosen"``.

    With ``tune_seeds`` (0: every seed), the grid runs on the first ``tune_seeds`` seeds only, and the chosen
    point then on the rest too: its row then holds every seed's runs (n says how many)."""
    if by not in ("selected", "final"):
        raise ValueError(f"--by {by!r}: choose by the 'selected' round's validation metric or the 'final' round's")
    out_dir = Path(out_dir)
    if tune_seeds < 0:
        raise ValueError(f"--tune-seeds {tune_seeds}: give the number of seeds to tune on (0: every seed)")
    tuning = {**sweep, "seeds": list(sweep["seeds"])[:tune_seeds or None]}
    table, chosen = [], {}
    for spec in methods:
        def score(point, spec=spec):
            return _grid_point(config_path, overrides, spec, point, out_dir, by, **tuning)

        if grid:
            rows = [score(list(zip(grid, values))) for values in itertools.product(*grid.values())]
            best = max(rows, key=lambda row: row["score"])
        else:
            start = load_config(config_path, spec_overrides(config_path, overrides, spec, sweep["quick"]))
            rows, best = adaptive_lr(start.federation.lr, score)
        if rest := list(sweep["seeds"])[len(tuning["seeds"]):]:
            best.update(_grid_point(config_path, overrides, spec, best["point"], out_dir, by, done=best["runs"],
                                    **{**sweep, "seeds": rest}))
        for row in rows:
            row["chosen"] = row is best
        chosen[spec] = best["assignment"]
        table += rows
    _write_tune(out_dir, list(grid or [LR_KEY]), table, chosen, by)
    return table, chosen


def adaptive_lr(start: float, score) -> tuple[list[dict], dict]:
    """The rows ``score([(LR_KEY, rate)])`` gives (each with a ``"score"``, higher is better) at the rates
    ``start x LR_STEP^k``, k = -1, 0, 1, then one step past the edge while the best is at an edge, at most
    LR_EXTENSIONS times; and the best row (on a tie, the rate nearest ``start``, which stops the search)."""
    rows = {k: score([(LR_KEY, _rate(start, k))]) for k in (-1, 0, 1)}

    def best() -> int:
        return max(rows, key=lambda k: (rows[k]["score"], -abs(k)))

    for _ in range(LR_EXTENSIONS):
        k = best()
        if min(rows) < k < max(rows):
            break
        k += 1 if k == max(rows) else -1
        rows[k] = score([(LR_KEY, _rate(start, k))])
    return [rows[k] for k in sorted(rows)], rows[best()]


def _rate(start: float, k: int) -> str:
    return f"{start * LR_STEP ** k:.3g}"


def _grid_point(config_path: str | None, overrides: list[str], spec: str, point: list[tuple[str, str]],
                out_dir: Path, by: str, done: list[dict] = (), **sweep) -> dict:
    """One grid point of a method over the sweep's seeds, after the runs ``done`` on earlier seeds: its row of the
    tuning table (validation only) and all its runs."""
    assignment = [f"{k}={v}" for k, v in point]
    name = spec + "".join(f"@{k.split('.')[-1]}={v}" for k, v in point)
    print(f"== tuning {spec}: {' '.join(assignment)} ==", flush=True)
    where = out_dir / dir_name(name)
    runs = [*done, *compare(config_path, overrides + assignment, [spec], where, tune_lr=False, **sweep)]
    if done:
        write_comparison(runs, where)
    metric, higher = runs[0]["selection"]["metric"], runs[0]["selection"]["higher_is_better"]
    row = {"method": spec, **dict(point), "metric": metric}
    for name, values in (("validation", [r["selected"]["validation"][metric] for r in runs]),
                         ("final", [r["rounds"][-1]["validation"][metric] for r in runs])):
        row[f"{name}_mean"] = statistics.fmean(values)
        row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    score = row["validation_mean" if by == "selected" else "final_mean"]
    return {**row, "n": len(runs), "seconds": sum(r["wall_seconds"] for r in runs),
            "score": score if higher else -score, "point": point, "assignment": assignment, "runs": runs}


def tuning_summary(table: list[dict], keys: list[str]) -> list[str]:
    """One line per method of a tuning table: ``tuning_line``."""
    methods = dict.fromkeys(row["method"] for row in table)
    return [f"- {spec}: {tuning_line([row for row in table if row['method'] == spec], keys)}" for spec in methods]


def tuning_line(rows: list[dict], keys: list[str]) -> str:
    """One method's search: the values tried, the one chosen, and what it cost (runs, seconds)."""
    best = next(row for row in rows if row["chosen"])
    tried = ", ".join(" ".join(str(row[k]) for k in keys) for row in rows)
    return (f"{' x '.join(keys)} in {{{tried}}}, chose {' '.join(best['assignment'])}; "
            f"{sum(row['n'] for row in rows)} runs, {sum(row['seconds'] for row in rows):.0f} s")


def _write_tune(out_dir: Path, keys: list[str], table: list[dict], chosen: dict, by: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = ["validation_mean", "validation_std", "final_mean", "final_std"]
    columns = ["method", *keys, "metric", *stats, "n", "seconds", "chosen"]
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in table]
    atomic_write(out_dir / "tune.csv", "\n".join(lines) + "\n")
    md = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in table:
        cells = [row["method"], *(str(row[k]) for k in keys), row["metric"], *(f"{row[c]:.4f}" for c in stats),
                 str(row["n"]), f"{row['seconds']:.0f}", "**chosen**" if row["chosen"] else ""]
        md.append("| " + " | ".join(cells) + " |")
    criterion = "the validation-selected round" if by == "selected" else "the final round"
    atomic_write(out_dir / "tune.md", f"# Tuning (validation only; chosen by the mean at {criterion})\n\n"
                 "validation_*: the validation metric at each run's selected round; final_*: at its final round.\n\n"
                 + "\n".join(md) + "\n\n" + "\n".join(tuning_summary(table, keys)) + "\n")
    atomic_write(out_dir / TUNED_FILE, json.dumps(chosen, indent=2) + "\n")


def read_tuned(path: str | Path) -> dict[str, list[str]]:
    """A tuning result (``<tune out>/tuned.json`` or its directory): method spec -> its chosen ``key=value``s."""
    path = Path(path)
    path = path / TUNED_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no tuning result at {path}: pass the --out directory of `fedtt tune`")
    return json.loads(path.read_text())
