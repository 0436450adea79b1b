import copy
import csv
import json
import struct

import pytest

from fedtt.report import format_bytes, round_summary, write_comparison, write_results


def make_results(method="fedtt", bytes_per_round=(200_000, 300_000, 500_000), label=None):
    """A realistic 3-round run; bytes_per_round is split evenly between up and down."""
    accs, losses, train = [0.61, 0.74, 0.79], [0.66, 0.52, 0.47], [0.69, None, 0.48]
    rounds = []
    for i, (b, acc, loss, tl) in enumerate(zip(bytes_per_round, accs, losses, train, strict=True), start=1):
        rounds.append({"round": i, "clients": 4, "train_loss": tl,
                       "eval": {"accuracy": acc, "loss": loss, "macro_f1": acc - 0.02},
                       "params_up": b // 8, "params_down": b // 8, "bytes_up": b // 2, "bytes_down": b // 2})
    res = {
        "method": method, "model": "minilm-l6", "task": "sst2", "engine": "inprocess", "seed": 0,
        "num_clients": 10, "clients_per_round": 4, "partition": {"kind": "dirichlet", "alpha": 0.5},
        "label_names": ["negative", "positive"], "client_label_histograms": [[30, 70], [55, 45]],
        "trainable_params": 24_576,
        "initial": {"accuracy": 0.5, "loss": 0.693},
        "rounds": rounds,
        "total_bytes": sum(bytes_per_round),
        "best": {"round": 3, "accuracy": 0.79}, "final": {"accuracy": 0.79, "loss": 0.47, "macro_f1": 0.77},
        "wall_seconds": 12.34,
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
    assert "| 1 | 4 | 0.6900 | 0.6100 | 0.6600 | 25,000 | 25,000 | 100.0 | 100.0 | 0.200 |" in md
    assert "| 2 | 4 | - | 0.7400 | 0.5200 | 37,500 | 37,500 | 150.0 | 150.0 | 0.500 |" in md  # dropped round
    assert "| 3 | 4 | 0.4800 | 0.7900 | 0.4700 | 62,500 | 62,500 | 250.0 | 250.0 | 1.000 |" in md
    for text in ("fedtt", "minilm-l6", "sst2", "dirichlet (alpha=0.5)", "24,576", "0.7900 (round 3)",
                 "1.000 MB", "12.3 s"):
        assert text in md

    assert png_size(tmp_path / "run" / "curves.png") == (1100, 440)


def test_results_json_is_json_safe(tmp_path):
    res = make_results()
    res["rounds"][0]["eval"]["loss"] = float("nan")
    res["partition"]["proportions"] = (0.5, 0.5)
    write_results(res, tmp_path)
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["rounds"][0]["eval"]["loss"] is None
    assert back["partition"]["proportions"] == [0.5, 0.5]


def test_write_comparison(tmp_path):
    runs = [make_results("lora", (3_000_000, 3_000_000, 4_000_000), label="LoRA r=8"),
            make_results("fedtt", (300_000, 300_000, 400_000), label="FedTT"),
            make_results("ffa-lora", (1_500_000, 1_500_000, 2_000_000))]
    write_comparison(runs, tmp_path)
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"LoRA r=8", "FedTT", "ffa-lora"}
    assert rows["LoRA r=8"]["x less traffic than LoRA"] == "1.0"
    assert rows["FedTT"]["x less traffic than LoRA"] == "10.0"
    assert rows["ffa-lora"]["x less traffic than LoRA"] == "2.0"
    assert rows["FedTT"]["total MB"] == "1.000"
    assert rows["FedTT"]["best accuracy (round)"] == "0.7900 (3)"
    assert int(rows["FedTT"]["bytes per round"]) == round(1_000_000 / 3)
    assert int(rows["FedTT"]["params per round"]) == round(250_000 / 3)
    md = (tmp_path / "comparison.md").read_text()
    assert "x less traffic than LoRA" in md and "| FedTT |" in md and "333.3 kB" in md
    assert png_size(tmp_path / "comparison.png") == (1100, 440)


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
    entry = {"round": 3, "clients": 4, "train_loss": 0.5011, "eval": {"accuracy": 0.8123, "loss": 0.4312},
             "params_up": 31_000, "params_down": 31_000, "bytes_up": 125_300, "bytes_down": 125_300}
    line = round_summary(entry, 10, 750_000)
    assert line == ("round  3/10  acc 0.8123  loss 0.4312  train 0.5011  up 125.3 kB  down 125.3 kB  "
                    "total 0.75 MB")
    entry["train_loss"] = None
    assert "train -" in round_summary(entry, 10, 750_000)
