import pytest

from fedtt.cli import main

FAST = ["--set", "model.num_hidden_layers=2", "--set", "federation.rounds=1", "--set", "federation.local_steps=1",
        "--set", "task.max_eval_examples=50"]


def fails_with(capsys, argv, message, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]  # log lines may come first; the verdict is one line
    assert message in err, err
    assert err.startswith("fedtt: ")


def test_info_lists_bundled_models_tasks_and_methods(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("minilm", "smollm2", "rotten_tomatoes", "trec", "sms_spam", "movie_dialog", "fedtt+"):
        assert name in out


def test_config_errors_name_the_key(capsys, tmp_path):
    fails_with(capsys, ["run", "--set", "federation.roundz=3"], "unknown config key federation.roundz")
    fails_with(capsys, ["run", "--set", "method=dora"], "method = 'dora' is not valid")
    fails_with(capsys, ["run", "--set", "federation.rounds=three"], "federation.rounds = 'three' is not valid")
    fails_with(capsys, ["run", "--config", str(tmp_path / "nope.toml")], "config file not found")
    (tmp_path / "bad.toml").write_text("[federation\nrounds = 3")
    fails_with(capsys, ["run", "--config", str(tmp_path / "bad.toml")], "is not valid TOML")
    fails_with(capsys, ["compare", "--seeds", "0,x"], "--seeds '0,x' is not a comma-separated list")
    fails_with(capsys, ["tune", "--grid", "federation.lr"], "is not of the form key=v1,v2")


def test_data_and_model_errors_are_refused_before_anything_is_written(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    fails_with(capsys, ["run", *FAST, *out, "--set", "task.name='/no/such/reviews.csv'"], "data file not found")
    (tmp_path / "reviews.csv").write_text("text,sentiment\n" + "".join(f"review {i},pos\n" for i in range(20)))
    fails_with(capsys, ["run", *FAST, *out, "--set", f"task.name='{tmp_path / 'reviews.csv'}'"], "label")
    (tmp_path / "tiny.csv").write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(20)))
    fails_with(capsys, ["run", *FAST, *out, "--set", f"task.name='{tmp_path / 'tiny.csv'}'",
                        "--set", "federation.num_clients=50", "--set", "federation.partition=iid"], "clients")
    fails_with(capsys, ["run", *FAST, *out, "--set", "model.name=no-such-model"], "unknown model 'no-such-model'")
    fails_with(capsys, ["run", *FAST, *out, "--set", "privacy.dp=true", "--set", "privacy.noise_multiplier=1.0",
                        "--set", "privacy.delta=0.1"], "privacy.delta = 0.1 is not below 1/n")
    assert not (tmp_path / "run").exists()


def test_run_then_predict_with_the_exported_adapter(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--out", str(out)]) == 0
    assert "done: test accuracy" in capsys.readouterr().out
    fails_with(capsys, ["run", *FAST, "--out", str(out)], "already holds a run")
    (tmp_path / "texts.txt").write_text("a mess\n\n")
    assert main(["predict", "--adapter", str(out / "adapter"), "--text", "a triumph", "--file",
                 str(tmp_path / "texts.txt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["a triumph", "a mess"]):
        label, probability, echoed = line.split("\t")
        assert label in ("negative", "positive") and 0.5 <= float(probability) <= 1 and echoed == text
    fails_with(capsys, ["predict", "--adapter", str(tmp_path), "--text", "x"], "fedtt.json not found")
    fails_with(capsys, ["predict", "--adapter", str(out / "adapter")], "give at least one text")
    fails_with(capsys, ["generate", "--adapter", str(out / "adapter"), "--prompt", "hi"], "does not generate")


@pytest.mark.parametrize("argv", [["run", "--set", "federation"], ["run", "--set", "=3"]])
def test_malformed_overrides(capsys, argv):
    fails_with(capsys, argv, "is not of the form key=value")
