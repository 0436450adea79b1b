import pytest

from fedtt.cli import main

FAST = ["--set", "model.num_hidden_layers=2", "--set", "federation.rounds=1", "--set", "federation.local_steps=1",
        "--set", "task.max_eval_examples=50"]


def fails_with(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert err.count("\n") == 0, "errors are one line"


def test_info_lists_bundled_models_and_tasks(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("minilm", "smollm2", "rotten_tomatoes", "trec", "sms_spam", "fedtt+"):
        assert name in out


def test_config_errors_name_the_key(capsys, tmp_path):
    fails_with(capsys, ["run", "--set", "federation.roundz=3"], "unknown config key federation.roundz")
    fails_with(capsys, ["run", "--set", "method=dora"], "method = 'dora' is not valid")
    fails_with(capsys, ["run", "--set", "federation.rounds=three"], "federation.rounds = 'three' has the wrong type")
    fails_with(capsys, ["run", "--config", str(tmp_path / "nope.toml")], "config file not found")
    (tmp_path / "bad.toml").write_text("[federation\nrounds = 3")
    fails_with(capsys, ["run", "--config", str(tmp_path / "bad.toml")], "is not valid TOML")


def test_data_and_model_errors(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    fails_with(capsys, ["run", *FAST, *out, "--set", "task.name='/no/such/reviews.csv'"], "data file not found")
    (tmp_path / "reviews.csv").write_text("text,sentiment\n" + "".join(f"review {i},pos\n" for i in range(20)))
    fails_with(capsys, ["run", *FAST, *out, "--set", f"task.name='{tmp_path / 'reviews.csv'}'"], "label")
    (tmp_path / "tiny.csv").write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(20)))
    fails_with(capsys, ["run", *FAST, *out, "--set", f"task.name='{tmp_path / 'tiny.csv'}'",
                        "--set", "federation.num_clients=50", "--set", "federation.partition=iid"], "clients")
    fails_with(capsys, ["run", *FAST, *out, "--set", "model.name=no-such-model"], "unknown model 'no-such-model'")


def test_run_then_predict_with_the_exported_adapter(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--out", str(out)]) == 0
    assert "final accuracy" in capsys.readouterr().out
    fails_with(capsys, ["run", *FAST, "--out", str(out)], "already holds a run")
    assert main(["predict", "--adapter", str(out / "adapter"), "--text", "a triumph", "--text", "a mess"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["a triumph", "a mess"]):
        label, probability, echoed = line.split("\t")
        assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1 and echoed == text
    fails_with(capsys, ["predict", "--adapter", str(tmp_path), "--text", "x"], "adapter_config.json not found")


@pytest.mark.parametrize("argv", [["run", "--set", "federation"], ["run", "--set", "=3"]])
def test_malformed_overrides(capsys, argv):
    fails_with(capsys, argv, "is not of the form key=value")
