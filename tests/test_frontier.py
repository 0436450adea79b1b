"""The default learning-rate search (``compare``, ``frontier``) and the accuracy-communication frontier: the search
widens past an edge and reads validation only, MB to target reads validation only, the Pareto set, and
``fedtt frontier`` end to end on a truncated MiniLM."""

import csv
import json
import math

import conftest
import pytest

import fedtt.federated.task as task_module
from fedtt.cli import main
from fedtt.compare import LR_EXTENSIONS, adaptive_lr, compare
from fedtt.config import METHODS
from fedtt.frontier import SIZES, _plan, pareto, to_target

TINY = ["model.num_hidden_layers=1", "model.max_length=32", "federation.rounds=1", "federation.local_steps=2",
        "federation.batch_size=8", "task.max_eval_examples=40", "federation.partition='iid'"]


@pytest.fixture
def tiny(tmp_path) -> list[str]:
    """TINY on 300 short labelled reviews: tokenising the bundled training set would take most of a run's time."""
    words = {"positive": ["moving", "brilliant", "warm", "sharp"], "negative": ["dull", "clumsy", "tired", "flat"]}
    lines = [f"a {words[label][i % 4]} film with scene {i},{label}" for i in range(300)
             for label in [("positive", "negative")[i % 2]]]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(lines) + "\n")
    return [*TINY, f"task.name='{tmp_path / 'reviews.csv'}'"]


def searched(start: float, best: float | None) -> tuple[list[float], float]:
    """The rates ``adaptive_lr`` tries from ``start`` when validation peaks at ``best`` (None: flat), and its pick."""
    def score(point):
        ((key, value),) = point
        assert key == "federation.lr"
        return {"rate": float(value), "score": 0.0 if best is None else -abs(math.log(float(value) / best))}

    rows, chosen = adaptive_lr(start, score)
    return [row["rate"] for row in rows], chosen["rate"]


def test_the_default_search_extends_its_grid_past_an_edge_up_to_a_limit():
    assert searched(1e-3, 1e-3) == ([0.000333, 0.001, 0.003], 0.001)  # best inside: three rates
    assert searched(1e-3, 9e-3) == ([0.000333, 0.001, 0.003, 0.009, 0.027], 0.009)  # one step past, then inside
    assert searched(1e-2, 1e-4) == ([0.00037, 0.00111, 0.00333, 0.01, 0.03], 0.00037)  # down to the limit
    assert searched(1e-3, 1.0) == ([0.000333, 0.001, 0.003, 0.009, 0.027], 0.027)  # the limit: the same budget
    assert searched(1e-3, None) == ([0.000333, 0.001, 0.003], 0.001)  # a flat validation keeps the start
    assert LR_EXTENSIONS == 2


def test_tuning_on_the_first_seed_runs_only_the_chosen_rate_on_the_others(tmp_path, capsys, tiny):
    runs = compare(None, [*tiny, "federation.lr=0.03"], ["lora"], tmp_path, quick=True, seeds=[0, 1], tune_seeds=1)
    rows = list(csv.DictReader((tmp_path / "tune" / "tune.csv").open()))
    assert [row["n"] for row in rows if row["chosen"] == "True"] == ["2"]
    assert {row["n"] for row in rows if row["chosen"] == "False"} == {"1"} and len(rows) >= 3
    assert [r["seed"] for r in runs] == [0, 1]
    out = capsys.readouterr().out
    assert out.count("== lora (seed 0) ==") == len(rows) and out.count("== lora (seed 1) ==") == 1  # none twice
    chosen = next(row for row in rows if row["chosen"] == "True")
    assert {r["rounds"][0]["lr"] for r in runs} == {float(chosen["federation.lr"])}


def test_compare_tunes_each_rate_on_validation_and_the_test_labels_change_no_choice(tmp_path, monkeypatch, tiny):
    # From 0.03 the search tries 0.01, 0.03, 0.09; validation is best at the edge (0.09), so it tries 0.27 too.
    setting = [*tiny, "federation.rounds=2", "federation.local_steps=3", "federation.lr=0.03"]
    plain = compare(None, setting, ["lora"], tmp_path / "plain", quick=True)
    conftest.flip_test_labels(monkeypatch)
    other = compare(None, setting, ["lora"], tmp_path / "flipped", quick=True)
    task_module._build_experiment.cache_clear()
    table = {d: list(csv.DictReader((tmp_path / d / "tune" / "tune.csv").open())) for d in ("plain", "flipped")}
    assert len(table["plain"]) > 3 and table["plain"] == [
        {**row, "seconds": plain_row["seconds"]} for row, plain_row in zip(table["flipped"], table["plain"])]
    tuned = json.loads((tmp_path / "plain" / "tune" / "tuned.json").read_text())
    assert tuned == json.loads((tmp_path / "flipped" / "tune" / "tuned.json").read_text())
    (runs,) = plain
    assert f"federation.lr={runs['rounds'][0]['lr']:.3g}" == tuned["lora"][0]  # the compared run: the chosen rate
    assert other[0]["selected"]["round"] == runs["selected"]["round"]
    assert [r["validation"] for r in other[0]["rounds"]] == [r["validation"] for r in runs["rounds"]]
    assert [r["eval"]["accuracy"] for r in other[0]["rounds"]] == pytest.approx(
        [1 - r["eval"]["accuracy"] for r in runs["rounds"]])
    md = (tmp_path / "plain" / "comparison.md").read_text()
    assert "Learning rates chosen on validation" in md and f"chose {tuned['lora'][0]}; {len(table['plain'])} runs" in md


def result(validation: list[float], test: list[float], initial=(0.5, 0.5), nbytes=1_000_000) -> dict:
    rounds = [{"round": i + 1, "validation": {"accuracy": v}, "eval": {"accuracy": t}, "bytes_up": nbytes // 2,
               "bytes_down": nbytes // 2} for i, (v, t) in enumerate(zip(validation, test))]
    return {"selection": {"metric": "accuracy", "higher_is_better": True}, "rounds": rounds,
            "initial": {"validation": {"accuracy": initial[0]}, "test": {"accuracy": initial[1]}}}


def test_mb_to_target_is_the_first_round_whose_validation_reaches_it():
    run = result([0.6, 0.72, 0.70, 0.8], [0.9, 0.61, 0.95, 0.5])
    assert to_target(run, 0.7) == (2.0, 0.61)  # round 2's validation first reaches 0.7; its test is reported
    assert to_target(result([0.6, 0.72, 0.70, 0.8], [0.99, 0.1, 0.2, 0.3]), 0.7) == (2.0, 0.1)  # test: no say
    assert to_target(run, 0.81) is None  # not reached
    assert to_target(run, 0.5) == (0.0, 0.5)  # the backbone already reaches it, before any byte is sent
    loss = {**result([0.6, 0.4], [0.5, 0.3]), "selection": {"metric": "accuracy", "higher_is_better": False}}
    assert to_target(loss, 0.45) == (2.0, 0.3)


def test_the_pareto_set_of_a_hand_made_list():
    points = [(0.80, 100), (0.75, 50), (0.70, 60), (0.80, 120), (0.60, 10), (0.75, 50), (0.85, 400), (0.59, 10)]
    assert pareto(points) == [True, True, False, False, True, True, True, False]


def test_every_method_has_a_size_knob_and_bad_sweeps_are_one_line_errors(capsys):
    assert set(SIZES) == set(METHODS)
    assert _plan(["lora", "ia3"], {}, quick=True) == [("lora", ["adapter.rank=1"]), ("lora", ["adapter.rank=2"]),
                                                      ("ia3", [])]
    assert _plan(["fedtt+"], {"fedtt+": ["0"]}, quick=False) == [("fedtt+", ["freezing.max_groups=0"])]
    for argv, message in ((["--methods", "centralized"], "frontier has no size knob for 'centralized'"),
                          (["--methods", "ia3", "--sizes", "ia3=2"], "ia3 has no size knob"),
                          (["--sizes", "lora"], "--sizes 'lora' is not of the form"),
                          (["--target", "1.5"], "--target 1.5: the target is a fraction"),
                          (["--wire-dtypes", "float8"], "federation.wire_dtype")):
        assert main(["frontier", "--out", "/nonexistent/never", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedtt: error: ") and "\n" not in err and message in err, err


def test_frontier_quick_end_to_end(tmp_path, capsys, tiny):
    argv = ["frontier", "--quick", "--methods", "lora,ia3", "--sizes", "lora=2", "--wire-dtypes", "float32,float16",
            "--out", str(tmp_path / "out")] + [a for o in tiny for a in ("--set", o)]
    assert main(argv) == 0
    assert "Pareto set" in capsys.readouterr().out
    tmp_path = tmp_path / "out"
    rows = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert [(r["method"], r["size"], r["wire"]) for r in rows] == [
        ("lora", "rank=2", "float32"), ("lora", "rank=2", "float16"), ("ia3", "-", "float32"), ("ia3", "-", "float16")]
    lora32, lora16, ia3_32, ia3_16 = rows
    assert lora16["lr"] == lora32["lr"] and ia3_16["lr"] == ia3_32["lr"]  # chosen at float32, kept at float16
    assert int(lora32["tuning_runs"]) >= 3 and lora16["tuning_runs"] == "0"
    assert float(lora16["bytes_per_round"]) < 0.6 * float(lora32["bytes_per_round"])
    assert float(ia3_32["bytes_per_round"]) < float(lora32["bytes_per_round"])
    assert any(r["pareto"] == "True" for r in rows) and all(r["reached"] in ("0", "1") for r in rows)
    md = (tmp_path / "frontier.md").read_text()
    assert "MB to target" in md and "chose federation.lr=" in md
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "lora" / "rank=2" / "float32" / "tune.md").is_file()
    # A longer sweep at the rates that search chose: no search runs; a point it did not search keeps its own rate.
    argv = ["frontier", "--methods", "lora", "--sizes", "lora=2,4", "--wire-dtypes", "float32", "--tuned",
            str(tmp_path), "--out", str(tmp_path / "long")] + [a for o in [*tiny, "federation.rounds=2"]
                                                              for a in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== tuning" not in out and out.count("== lora (seed 0) ==") == 2
    rank2, rank4 = list(csv.DictReader((tmp_path / "long" / "frontier.csv").open()))
    assert rank2["lr"] == lora32["lr"] and float(rank4["lr"]) == 1e-3 and rank2["tuning_runs"] == "0"
    md = (tmp_path / "long" / "frontier.md").read_text()
    assert "chose federation.lr=" in md and "in an earlier search" in md and "its method's own rate" in md
