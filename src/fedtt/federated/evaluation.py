"""Losses and metrics for both task kinds; the kind decides the loss, not the federation.

Classification: cross-entropy of the head's logits; accuracy, loss, macro-F1. Instruction (causal LM):
the mean cross-entropy of each example's response tokens (per example, then over the batch, so one example's
gradient does not depend on the others' lengths, as DP-SGD's clipping needs); held-out loss and perplexity;
for a templated labelled set, the accuracy of greedy generation (exact match after normalisation) and of the
label with the highest likelihood; for open-ended pairs, ROUGE-L (``rouge-score``).
"""

from __future__ import annotations

import math
import re
import string

import torch
import torch.nn.functional as F

from .batches import IGNORE, Encoded, batch, fit, pad, response_ids

GENERATION = {"decoding": "greedy", "do_sample": False}  # recorded in results.json with max_new_tokens


def classification_losses(model, inputs, targets) -> torch.Tensor:
    return F.cross_entropy(model(**inputs).logits.float(), targets, reduction="none")


def response_losses(model, inputs, targets, reduce: str = "mean") -> torch.Tensor:
    """Per example: the mean (or sum) of its response tokens' cross-entropy. The LM head is applied to the
    response positions only (a full-vocabulary logit tensor for every position would be most of the memory)."""
    hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
    shifted = targets[:, 1:]
    keep = shifted != IGNORE
    token = F.cross_entropy(model.get_output_embeddings()(hidden[keep]).float(), shifted[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    total = torch.zeros(len(targets), device=token.device, dtype=token.dtype).index_add(0, rows, token)
    return total if reduce == "sum" else total / keep.sum(1).clamp(min=1)


def losses(kind: str, model, inputs, targets) -> torch.Tensor:
    return (classification_losses if kind == "classification" else response_losses)(model, inputs, targets)


def selection_metric(task) -> tuple[str, bool]:
    """The validation metric a round is chosen by, and whether higher is better."""
    return ("accuracy", True) if task.labelled else ("loss", False)


def normalise(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def evaluate(exp, data: Encoded) -> dict[str, float]:
    model = exp.model.eval()
    if exp.task.kind == "classification":
        return _classification(exp, model, data)
    return _instruction(exp, model, data)


def _classification(exp, model, data: Encoded) -> dict[str, float]:
    loss_sum, predictions = 0.0, []
    for rows in _chunks(len(data), exp.config.task.eval_batch_size):
        inputs, targets = batch(data, rows, exp.device)
        logits = model(**inputs).logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        predictions += logits.argmax(-1).tolist()
    metrics = _label_metrics(predictions, data.labels, len(exp.task.label_names))
    return {**metrics, "loss": loss_sum / len(data)}


def _instruction(exp, model, data: Encoded) -> dict[str, float]:
    size = exp.config.task.eval_batch_size
    loss_sum, token_loss, tokens = 0.0, 0.0, 0
    for rows in _chunks(len(data), size):
        inputs, targets = batch(data, rows, exp.device)
        sums = response_losses(model, inputs, targets, reduce="sum")
        counts = (targets[:, 1:] != IGNORE).sum(1)
        loss_sum += (sums / counts.clamp(min=1)).sum().item()
        token_loss, tokens = token_loss + sums.sum().item(), tokens + int(counts.sum())
    metrics = {"loss": loss_sum / len(data), "perplexity": math.exp(min(token_loss / max(tokens, 1), 50.0))}
    prompts = [data.input_ids[i][: data.response_start[i]] for i in range(len(data))]
    generated = generate(model, exp.tokenizer, prompts, exp.device, exp.config.task.max_new_tokens, size)
    if exp.task.labelled:
        words = [normalise(w) for w in exp.task.label_words]
        exact = [words.index(normalise(g)) if normalise(g) in words else -1 for g in generated]
        metrics["accuracy"] = sum(p == y for p, y in zip(exact, data.labels)) / len(data)
        scores = label_scores(model, exp.tokenizer, prompts, exp.task.label_words, exp.device,
                              exp.config.model.max_length, size)
        likely = [max(range(len(words)), key=row.__getitem__) for row in scores]
        metrics.update({f"label_{k}": v for k, v in _label_metrics(likely, data.labels, len(words)).items()})
    else:
        from rouge_score import rouge_scorer  # imported here: only open-ended tasks need it

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        references = [exp.tokenizer.decode(data.input_ids[i][data.response_start[i]:], skip_special_tokens=True)
                      for i in range(len(data))]
        scores = [scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(references, generated)]
        metrics["rougeL"] = sum(scores) / len(data)
    return metrics


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int, batch_size: int) -> list[str]:
    """Batched greedy decoding of token-id prompts (left-padded), at most ``max_new_tokens`` new tokens each."""
    out = []
    for rows in _chunks(len(prompts), batch_size):
        ids, mask = pad([prompts[r] for r in rows], tokenizer.pad_token_id, left=True)
        new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [text.strip() for text in out]


@torch.no_grad()
def label_scores(model, tokenizer, prompts: list[list[int]], words: list[str], device, max_length: int,
                 batch_size: int) -> list[list[float]]:
    """For each prompt, the log-likelihood of each label word (and the end of the turn) as its response."""
    options = [response_ids(tokenizer, w) for w in words]
    sequences, starts = [], []
    for prompt in prompts:
        for option in options:
            ids, start = fit(prompt, option, max_length)
            sequences.append(ids)
            starts.append(start)
    scored = Encoded(sequences, [-1] * len(sequences), starts, tokenizer.pad_token_id)
    nll = []
    for rows in _chunks(len(scored), batch_size):
        inputs, targets = batch(scored, rows, device)
        nll += response_losses(model, inputs, targets, reduce="sum").tolist()
    k = len(options)
    return [[-v for v in nll[i * k:(i + 1) * k]] for i in range(len(prompts))]


def _label_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    pred, truth = torch.tensor(predictions), torch.tensor(labels)
    f1s = []
    for c in range(num_labels):
        tp = ((pred == c) & (truth == c)).sum().item()
        denom = (pred == c).sum().item() + (truth == c).sum().item()
        if (truth == c).any():
            f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": (pred == truth).float().mean().item(), "macro_f1": sum(f1s) / len(f1s)}


def _chunks(n: int, size: int):
    return [range(start, min(start + size, n)) for start in range(0, n, size)]
