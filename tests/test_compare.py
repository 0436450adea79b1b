import csv
import json
import re

import pytest

import fedtt
from fedtt.cli import main
from fedtt.compare import code_note, method_overrides, parse_grid, read_tuned, tune
from fedtt.report import code_version

TINY = ["model.num_hidden_layers=2", "model.max_length=32", "federation.rounds=1", "federation.local_steps=2",
        "federation.batch_size=8", "task.max_eval_examples=40", "federation.partition='iid'"]


def test_compare_quick_over_two_seeds_writes_mean_and_std(tmp_path, capsys):
    argv = ["compare", "--quick", "--no-tune", "--seeds", "0,1", "--out", str(tmp_path),
            "--methods", "fedtt,lora,fedtt+:cyclic,centralized:lora"] + [a for o in TINY for a in ("--set", o)]
    assert main(argv) == 0
    rows = {row["method"]: row for row in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert set(rows) == {"fedtt", "lora", "fedtt+:cyclic", "centralized:lora"}
    for row in rows.values():
        assert row["n"] == "2" and row["test_selected_mean"] and row["test_selected_std"] and row["test_final_std"]
    assert float(rows["lora"]["x less traffic than LoRA"]) == pytest.approx(1.0)
    assert float(rows["fedtt+:cyclic"]["bytes_per_round"]) < float(rows["fedtt"]["bytes_per_round"]) < float(
        rows["lora"]["bytes_per_round"])
    runs = {(m, s): json.loads((tmp_path / m.replace(":", "-").replace("+", "plus") / f"seed-{s}" /
                                "results.json").read_text()) for m in rows for s in (0, 1)}
    assert runs["fedtt", 0]["client_label_histograms"] == runs["lora", 0]["client_label_histograms"]
    assert runs["fedtt", 0]["client_label_histograms"] != runs["fedtt", 1]["client_label_histograms"]  # data seed
    assert runs["centralized:lora", 1]["num_clients"] == 1 and runs["centralized:lora", 1]["method"] == "lora"
    assert runs["lora", 0]["seed"] == 0 and runs["lora", 1]["seed"] == 1
    assert (tmp_path / "comparison.png").stat().st_size > 0 and "± " in (tmp_path / "comparison.md").read_text()


def test_tune_picks_each_methods_value_on_validation_only(tmp_path):
    chosen = tune(None, TINY, ["fedtt", "lora"], {"federation.lr": ["1e-4", "3e-2"]}, tmp_path, seeds=[0])
    table = list(csv.DictReader((tmp_path / "tune.csv").open()))
    assert len(table) == 4
    for method in ("fedtt", "lora"):
        rows = [r for r in table if r["method"] == method]
        best = max(rows, key=lambda r: float(r["validation_mean"]))
        assert chosen[method] == [f"federation.lr={best['federation.lr']}"]
        assert best["chosen"] == "True" and sum(r["chosen"] == "True" for r in rows) == 1
    assert read_tuned(tmp_path) == chosen
    assert "**chosen**" in (tmp_path / "tune.md").read_text()


def test_resumed_sweep_reuses_finished_runs_and_continues_stopped_ones(tmp_path, capsys):
    two_rounds = [*TINY, "federation.rounds=2"]
    tune(None, TINY, ["lora"], {"federation.lr": ["1e-3"]}, tmp_path, seeds=[0])
    finished = tmp_path / "lora@lr=1e-3" / "lora" / "seed-0" / "results.json"
    before = finished.read_text()
    assert json.loads(before)["code"] == [code_version()]  # the code that made the run
    capsys.readouterr()
    # The sweep grows by a grid point; the finished run is reused as it is (same config, same file).
    tune(None, TINY, ["lora"], {"federation.lr": ["1e-3", "3e-3"]}, tmp_path, seeds=[0], resume=True)
    assert "reusing the finished run" in capsys.readouterr().out and finished.read_text() == before
    assert len(list(csv.DictReader((tmp_path / "tune.csv").open()))) == 2
    # A run with more rounds continues from its checkpoint: round 1 is the old one, round 2 is new.
    tune(None, two_rounds, ["lora"], {"federation.lr": ["1e-3"]}, tmp_path, seeds=[0], resume=True)
    rounds = json.loads(finished.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0] == json.loads(before)["rounds"][0]
    assert json.loads(finished.read_text())["code"] == [code_version()]  # the same code continued it
    # Scored by the final round (the adapter a run saves): the table has both means, the final one is round 2's.
    tune(None, two_rounds, ["lora"], {"federation.lr": ["1e-3"]}, tmp_path, seeds=[0], resume=True, by="final")
    row = next(csv.DictReader((tmp_path / "tune.csv").open()))
    assert float(row["final_mean"]) == pytest.approx(rounds[1]["validation"]["accuracy"])
    assert float(row["validation_mean"]) == pytest.approx(max(r["validation"]["accuracy"] for r in rounds))
    assert "chosen by the mean at the final round" in (tmp_path / "tune.md").read_text()
    with pytest.raises(ValueError, match="--by 'last'"):
        tune(None, TINY, ["lora"], {"federation.lr": ["1e-3"]}, tmp_path, seeds=[0], by="last")
    with pytest.raises(ValueError, match="the config changed in federation.batch_size"):
        tune(None, [*TINY, "federation.batch_size=4"], ["lora"], {"federation.lr": ["1e-3"]}, tmp_path,
             seeds=[0], resume=True)
    # Without its checkpoint (docs/results/ keeps only config.toml and results.json) the run is still reused.
    (finished.parent / "checkpoint.safetensors").unlink()
    after = finished.read_text()
    capsys.readouterr()
    tune(None, two_rounds, ["lora"], {"federation.lr": ["1e-3"]}, tmp_path, seeds=[0], resume=True)
    assert "reusing the finished run" in capsys.readouterr().out and finished.read_text() == after
    with pytest.raises(ValueError, match="the config changed in federation.batch_size"):
        tune(None, [*two_rounds, "federation.batch_size=4"], ["lora"], {"federation.lr": ["1e-3"]}, tmp_path,
             seeds=[0], resume=True)
    with pytest.raises(ValueError, match="finished 2 rounds and has no checkpoint.safetensors"):
        tune(None, [*two_rounds, "federation.rounds=3"], ["lora"], {"federation.lr": ["1e-3"]}, tmp_path,
             seeds=[0], resume=True)


def test_a_reused_run_says_when_other_code_made_it():
    current = code_version()
    assert current["fedtt"] == fedtt.__version__
    assert re.fullmatch("[0-9a-f]{40}", current["commit"])  # the tests run from a git checkout
    assert code_note({"code": [current]}) == ""
    assert code_note({"code": [{"fedtt": "0.1.0", "commit": "0123456789abcdef"}, current]}) == ""
    note = code_note({"code": [{"fedtt": "0.1.0", "commit": "0123456789abcdef", "source_changed": True}]})
    assert note.startswith(" (made by fedtt 0.1.0 at 0123456789 with changed sources; this is fedtt ")
    assert note.endswith(": --overwrite runs it again)") and current["commit"][:10] in note
    assert "an earlier fedtt that did not record its code" in code_note({})
    current["commit"] = "changed by a caller"
    assert code_version()["commit"] != current["commit"]  # computed once per process, handed out as copies


def test_method_specs():
    assert method_overrides("fedtt+:adaptive", 3, 20) == ["method=fedtt+", "freezing.policy=adaptive"]
    assert "federation.local_steps=60" in method_overrides("centralized", 3, 20)
    assert "method=lora" in method_overrides("centralized:lora", 3, 20)
    with pytest.raises(ValueError, match="policies go with fedtt\\+ only"):
        method_overrides("lora:cyclic", 3, 20)
    assert "method=fed-sb" in method_overrides("centralized:fed-sb", 3, 20)
    with pytest.raises(ValueError, match="centralized runs one of fedtt, lora, ffa-lora, vera, ia3, fed-sb"):
        method_overrides("centralized:fedtt+", 3, 20)
    assert parse_grid(["federation.lr=1e-3, 3e-3", "adapter.rank=2"]) == {"federation.lr": ["1e-3", "3e-3"],
                                                                        "adapter.rank": ["2"]}
