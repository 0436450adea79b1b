import copy
import csv
import json
import struct

import pytest

from fedtt.report import format_bytes, round_summary, summarize, write_comparison, write_results

VALIDATION = [0.60, 0.80, 0.78]
TEST = [0.61, 0.74, 0.79]


def make_results(method="fedtt", bytes_per_round=(200_000, 300_000, 500_000), label=None, shift=0.0, seed=0):
    """A realistic 3-round run; bytes_per_round is split evenly between up and down."""
    losses, train = [0.66, 0.52, 0.47], [0.69, None, 0.48]
    rounds = []
    for i, (b, val, acc, loss, tl) in enumerate(zip(bytes_per_round, VALIDATION, TEST, losses, train), start=1):
        rounds.append({"round": i, "clients": 4, "train_loss": tl,
                       "validation": {"accuracy": val + shift, "loss": loss},
                       "eval": {"accuracy": acc + shift, "loss": loss, "macro_f1": acc - 0.02},
                       "params_up": b // 8, "params_down": b // 8, "bytes_up": b // 2, "bytes_down": b // 2})
    res = {
        "method": method, "model": "minilm-l6", "task": "sst2", "engine": "inprocess", "seed": seed, "data_seed": seed,
        "num_clients": 10, "clients_per_round": 4, "partition": {"kind": "dirichlet", "alpha": 0.5},
        "label_names": ["negative", "positive"], "client_label_histograms": [[30, 70], [55, 45]],
        "trainable_params": 24_576,
        "selection": {"split": "validation", "metric": "accuracy", "higher_is_better": True},
        "initial": {"validation": {"accuracy": 0.5, "loss": 0.693}, "test": {"accuracy": 0.5, "loss": 0.693}},
        "rounds": rounds, "total_bytes": sum(bytes_per_round), "status": "finished",
        "selected": {"round": 2, "metric": "accuracy", "validation": rounds[1]["validation"],
                     "test": rounds[1]["eval"]},
        "final": rounds[-1]["eval"], "wall_seconds": 12.34,
    }
    if label:
        res["label"] = label
    return res


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_results(tmp_path):
    res = make_results()
    before = copy.deepcopy(res)
    write_results(res, tmp_path / "run")
    assert res == before  # not mutated
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == res

    md = (tmp_path / "run" / "results.md").read_text()
    assert "| 1 | 4 | 0.6900 | 0.6000 | 0.6100 | 0.6600 | 25,000 | 25,000 | 100.0 | 100.0 | 0.200 |" in md
    assert "| 2 | 4 | - | 0.8000 | 0.7400 | 0.5200 | 37,500 | 37,500 | 150.0 | 150.0 | 0.500 |" in md
    for text in ("fedtt", "minilm-l6", "sst2", "dirichlet (alpha=0.5)", "24,576",
                 "selected round (best validation accuracy): 2; validation 0.8000, test 0.7400",
                 "final round: test accuracy 0.7900", "1.000 MB", "12.3 s"):
        assert text in md
    assert png_size(tmp_path / "run" / "curves.png") == (1100, 440)
    write_results(res, tmp_path / "json-only", tables=False)
    assert {p.name for p in (tmp_path / "json-only").iterdir()} == {"results.json"}


def test_results_json_is_json_safe(tmp_path):
    res = make_results()
    res["rounds"][0]["eval"]["loss"] = float("nan")
    res["partition"]["proportions"] = (0.5, 0.5)
    write_results(res, tmp_path)
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["rounds"][0]["eval"]["loss"] is None
    assert back["partition"]["proportions"] == [0.5, 0.5]


def test_comparison_pools_seeds_into_mean_std_and_n(tmp_path):
    runs = [make_results("lora", (3_000_000, 3_000_000, 4_000_000), label="LoRA r=8", shift=d, seed=i)
            for i, d in enumerate((0.0, 0.02))]
    runs += [make_results("fedtt", (300_000, 300_000, 400_000), label="FedTT", shift=d, seed=i)
             for i, d in enumerate((0.0, -0.02, 0.01))]
    runs.append(make_results("ffa-lora", (1_500_000, 1_500_000, 2_000_000)))
    write_comparison(runs, tmp_path)
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"LoRA r=8", "FedTT", "ffa-lora"}
    fedtt = rows["FedTT"]
    assert fedtt["n"] == "3"
    assert float(fedtt["test_selected_mean"]) == pytest.approx(0.74 - 0.01 / 3)
    assert float(fedtt["test_selected_std"]) == pytest.approx(0.01527525, rel=1e-6)
    assert float(fedtt["test_final_mean"]) == pytest.approx(0.79 - 0.01 / 3)
    assert float(rows["ffa-lora"]["test_selected_std"]) == 0.0
    assert float(fedtt["x less traffic than LoRA"]) == pytest.approx(10.0)
    assert float(rows["ffa-lora"]["x less traffic than LoRA"]) == pytest.approx(2.0)
    assert float(fedtt["total_mb"]) == pytest.approx(1.0)
    assert float(fedtt["bytes_per_round"]) == pytest.approx(1_000_000 / 3)
    md = (tmp_path / "comparison.md").read_text()
    assert "| FedTT | 3 | 0.7367 ± 0.0153 |" in md and "333.3 kB" in md and "x less traffic than LoRA" in md
    assert png_size(tmp_path / "comparison.png") == (1100, 440)
    assert [r["method"] for r in summarize(runs)] == ["LoRA r=8", "FedTT", "ffa-lora"]


def test_a_decoder_comparison_adds_held_out_loss_and_label_likelihood_at_the_selected_round(tmp_path):
    runs = []
    for seed, (loss, label_accuracy) in enumerate(((0.50, 0.70), (0.30, 0.60))):
        res = make_results("fedtt", seed=seed)
        res["kind"] = "instruction"
        res["selected"]["test"] = {**res["selected"]["test"], "loss": loss, "label_accuracy": label_accuracy}
        runs.append(res)
    row, = summarize(runs)
    assert row["test_loss_selected_mean"] == pytest.approx(0.40)
    assert row["test_label_accuracy_selected_mean"] == pytest.approx(0.65)
    assert row["test_label_accuracy_selected_std"] == pytest.approx(0.0707107, rel=1e-5)
    write_comparison(runs, tmp_path)
    md = (tmp_path / "comparison.md").read_text()
    assert "| wall seconds | test loss @ selected | test label_accuracy @ selected |" in md
    assert "| 12.3 | 0.4000 ± 0.1414 | 0.6500 ± 0.0707 |" in md
    write_comparison([make_results()], tmp_path / "classifier")  # a classifier's table keeps its columns
    assert "test loss @ selected" not in (tmp_path / "classifier" / "comparison.md").read_text()


def test_comparison_without_lora_has_no_ratio(tmp_path):
    write_comparison([make_results("fedtt"), make_results("fedtt+")], tmp_path)
    with open(tmp_path / "comparison.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert "x less traffic than LoRA" not in reader.fieldnames
        assert [r["method"] for r in reader] == ["fedtt", "fedtt+"]


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (812, "812 B"), (999, "999 B"), (1000, "1.0 kB"), (12_400, "12.4 kB"),
    (999_949, "999.9 kB"), (999_999, "1.00 MB"), (3_100_000, "3.10 MB"), (999_999_999, "1.00 GB"),
    (1_200_000_000, "1.20 GB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_bytes_rejects_negative():
    with pytest.raises(ValueError):
        format_bytes(-1)


def test_round_summary():
    entry = {"round": 3, "clients": 4, "train_loss": 0.5011, "validation": {"accuracy": 0.8010},
             "eval": {"accuracy": 0.8123, "loss": 0.4312}, "params_up": 31_000, "params_down": 31_000,
             "bytes_up": 125_300, "bytes_down": 125_300}
    line = round_summary(entry, 10, 750_000)
    assert line == ("round  3/10  val accuracy 0.8010  test accuracy 0.8123  test loss 0.4312  train 0.5011  "
                    "up 125.3 kB  down 125.3 kB  total 0.75 MB")
    entry.update(train_loss=None, epsilon_max=2.5, skipped="0 of 3 replies valid")
    line = round_summary(entry, 10, 750_000)
    assert "train -" in line and "epsilon 2.500" in line and "(not aggregated: 0 of 3 replies valid)" in line
