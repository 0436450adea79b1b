import csv

import pytest

from fedtt.compare import compare, method_overrides

TINY = ["model.num_hidden_layers=2", "model.max_length=32", "federation.rounds=2", "federation.local_steps=2",
        "federation.batch_size=8", "task.max_eval_examples=50", "federation.partition=iid"]


def test_compare_runs_each_method_on_the_same_split_and_writes_the_comparison(tmp_path):
    runs = compare(None, TINY, ["fedtt", "fedtt+:cyclic", "lora", "centralized"], tmp_path, quick=True)
    by_label = {r["label"]: r for r in runs}
    assert by_label["fedtt"]["client_label_histograms"] == by_label["lora"]["client_label_histograms"]
    assert by_label["centralized"]["num_clients"] == 1
    assert sum(by_label["centralized"]["client_label_histograms"][0]) == sum(
        map(sum, by_label["fedtt"]["client_label_histograms"]))
    assert by_label["fedtt+:cyclic"]["total_bytes"] < by_label["fedtt"]["total_bytes"] < by_label["lora"]["total_bytes"]
    rows = {row["method"]: row for row in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert set(rows) == {"fedtt", "fedtt+:cyclic", "lora", "centralized"}
    ratio = by_label["lora"]["total_bytes"] / by_label["fedtt"]["total_bytes"]
    assert float(rows["fedtt"]["x less traffic than LoRA"]) == pytest.approx(ratio, abs=0.05)
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "fedtt+:cyclic" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "fedttplus-cyclic" / "results.json").exists()


def test_method_specs():
    assert method_overrides("fedtt+:adaptive", 3, 20) == ["method=fedtt+", "freezing.policy=adaptive"]
    assert "federation.local_steps=60" in method_overrides("centralized", 3, 20)
    with pytest.raises(ValueError, match="policies go with fedtt\\+ only"):
        method_overrides("lora:cyclic", 3, 20)
