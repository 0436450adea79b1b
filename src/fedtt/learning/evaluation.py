"""Losses and metrics for both task kinds; the kind decides the loss, not the federation.

Classification: cross-entropy of the head's logits; accuracy, loss, macro-F1. Instruction (causal LM):
the mean cross-entropy of each example's response tokens (per example, then over the batch, so one example's
gradient does not depend on the others' lengths, as DP-SGD's clipping needs); held-out loss and perplexity;
for a templated labelled set, the accuracy of greedy generation (exact match after normalisation) and of the
label with the highest likelihood; for open-ended pairs, ROUGE-L (``rouge-score``). A decoder's evaluation runs
each prompt once (``answer``): generation and every scored continuation start from its key/value cache.
"""

from __future__ import annotations

import copy
import math
import re
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batches import IGNORE, Encoded, batch, pad, response_ids

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


@dataclass
class Evaluator:
    """What evaluating a model on a held-out split needs besides the model: the task, its tokenizer, the device
    and the task config's batch size and generation length."""

    task: object  # data.TaskData
    tokenizer: object
    device: torch.device
    batch_size: int
    max_new_tokens: int

    @torch.no_grad()
    def __call__(self, model, data: Encoded) -> dict[str, float]:
        model = model.eval()
        if self.task.kind == "classification":
            return self._classification(model, data)
        return self._instruction(model, data)

    def _classification(self, model, data: Encoded) -> dict[str, float]:
        loss_sum, predictions = 0.0, []
        batches = _by_length(data.input_ids, self.batch_size)
        for rows in batches:
            inputs, targets = batch(data, rows, self.device)
            logits = model(**inputs).logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            predictions += logits.argmax(-1).tolist()
        metrics = _label_metrics(_in_row_order(batches, predictions), data.labels, len(self.task.label_names))
        return {**metrics, "loss": loss_sum / len(data)}

    def _instruction(self, model, data: Encoded) -> dict[str, float]:
        prompts = [ids[:start] for ids, start in zip(data.input_ids, data.response_start)]
        responses = [ids[start:] for ids, start in zip(data.input_ids, data.response_start)]
        words = self.task.label_words if self.task.labelled else []
        answers = answer(model, self.tokenizer, prompts, self.device, self.batch_size,
                         self.max_new_tokens, responses, words)
        counts = [len(r) for r in responses]
        metrics = {"loss": sum(v / max(c, 1) for v, c in zip(answers.response_nll, counts)) / len(data),
                   "perplexity": math.exp(min(sum(answers.response_nll) / max(sum(counts), 1), 50.0))}
        generated = answers.generated
        if self.task.labelled:
            normalised = [normalise(w) for w in words]
            exact = [normalised.index(normalise(g)) if normalise(g) in normalised else -1 for g in generated]
            metrics["accuracy"] = sum(p == y for p, y in zip(exact, data.labels)) / len(data)
            likely = [max(range(len(words)), key=row.__getitem__) for row in answers.label_scores]
            metrics.update({f"label_{k}": v for k, v in _label_metrics(likely, data.labels, len(words)).items()})
        else:
            from rouge_score import rouge_scorer  # imported here: only open-ended tasks need it

            scorer = rouge_scorer.RougeScorer(["rougeL"])
            references = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            scores = [scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(references, generated)]
            metrics["rougeL"] = sum(scores) / len(data)
        return metrics


@dataclass
class Answers:
    generated: list[str]  # greedy continuations (empty when no new tokens were asked for)
    response_nll: list[float]  # the summed negative log-likelihood of each given response
    label_scores: list[list[float]]  # per prompt, each label word's log-likelihood as its response


@torch.no_grad()
def answer(model, tokenizer, prompts: list[list[int]], device, batch_size: int, max_new_tokens: int = 0,
           responses: list[list[int]] | None = None, words=()) -> Answers:
    """What evaluation and prediction ask of a decoder, from one forward pass of each (left-padded) prompt:
    its key/value cache is shared by greedy decoding, the scoring of the given response and of every label
    word. A label word is a few tokens, so scoring k of them costs about one prompt's forward, not k."""
    options = [response_ids(tokenizer, w) for w in words]
    result = Answers([], [], [])
    batches = _by_length(prompts, batch_size)
    for rows in batches:
        ids, mask = pad([prompts[r] for r in rows], tokenizer.pad_token_id, left=True)
        ids, mask = ids.to(device), mask.to(device)
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        prompt = (out.last_hidden_state[:, -1], out.past_key_values, mask)
        if responses is not None:
            result.response_nll += _continuation_nll(model, prompt, [responses[r] for r in rows],
                                                     tokenizer.pad_token_id).tolist()
        if options:
            nll = [_continuation_nll(model, prompt, [o] * len(rows), tokenizer.pad_token_id) for o in options]
            result.label_scores += (-torch.stack(nll, 1)).tolist()
        if max_new_tokens:  # last: decoding grows the prompt's cache itself, the scoring above used copies
            result.generated += _greedy(model, tokenizer, prompt, max_new_tokens)
    return Answers(*(_in_row_order(batches, values) for values in (result.generated, result.response_nll,
                                                                  result.label_scores)))


def generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding of token-id prompts, at most ``max_new_tokens`` new tokens each."""
    return answer(model, tokenizer, prompts, device, batch_size, max_new_tokens).generated


def label_scores(model, tokenizer, prompts: list[list[int]], words: list[str], device, max_length: int,
                 batch_size: int) -> list[list[float]]:
    """For each prompt, the log-likelihood of each label word (and the end of the turn) as its response; a
    prompt keeps its last tokens, as in training, so that it and the longest word fit in ``max_length``."""
    keep = max(max_length - max(len(response_ids(tokenizer, w)) for w in words), max_length // 4)
    return answer(model, tokenizer, [p[-keep:] for p in prompts], device, batch_size, words=words).label_scores


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row counts from its first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _extend(model, prompt, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states of ``tokens`` fed after the cached prompt (on a copy of the cache: it grows in place)."""
    _, cache, mask = prompt
    full = torch.cat([mask, token_mask], 1)
    return model.base_model(input_ids=tokens, attention_mask=full, position_ids=_positions(full)[:, mask.shape[1]:],
                            past_key_values=copy.deepcopy(cache), use_cache=True).last_hidden_state


def _continuation_nll(model, prompt, continuations: list[list[int]], pad_id: int) -> torch.Tensor:
    """Per row, the summed negative log-likelihood of its continuation after its prompt."""
    last, _, mask = prompt
    tokens, real = (t.to(mask.device) for t in pad(continuations, pad_id))
    hidden = last[:, None]
    if tokens.shape[1] > 1:
        hidden = torch.cat([hidden, _extend(model, prompt, tokens[:, :-1], real[:, :-1])], 1)
    keep = real.bool()
    token = F.cross_entropy(model.get_output_embeddings()(hidden[keep]).float(), tokens[keep], reduction="none")
    return torch.zeros(len(tokens), device=token.device).index_add(0, keep.nonzero()[:, 0], token)


def _greedy(model, tokenizer, prompt, max_new_tokens: int) -> list[str]:
    last, cache, mask = prompt
    head = model.get_output_embeddings()
    token = head(last).argmax(-1)
    done, new = token == tokenizer.eos_token_id, [token]
    for _ in range(max_new_tokens - 1):
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        hidden = model.base_model(input_ids=token[:, None], attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                                  past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        token = head(hidden).argmax(-1).masked_fill(done, tokenizer.pad_token_id)
        done = done | (token == tokenizer.eos_token_id)
        new.append(token)
    return [text.strip() for text in tokenizer.batch_decode(torch.stack(new, 1), skip_special_tokens=True)]


def _label_metrics(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    pred, truth = torch.tensor(predictions), torch.tensor(labels)
    f1s = []
    for c in range(num_labels):
        tp = ((pred == c) & (truth == c)).sum().item()
        denom = (pred == c).sum().item() + (truth == c).sum().item()
        if (truth == c).any():
            f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": (pred == truth).float().mean().item(), "macro_f1": sum(f1s) / len(f1s)}


def _by_length(sequences: list[list[int]], size: int) -> list[list[int]]:
    """Row indices in batches of similar lengths: padding to each batch's longest row then costs little (on
    Rotten Tomatoes 40% fewer tokens than batches in row order). Callers put results back with _in_row_order."""
    order = sorted(range(len(sequences)), key=lambda row: len(sequences[row]))
    return [order[start:start + size] for start in range(0, len(order), size)]


def _in_row_order(batches: list[list[int]], values: list) -> list:
    """``values`` given batch by batch (empty, or one per row) back in row order."""
    if not values:
        return values
    placed = [None] * len(values)
    for row, value in zip((row for rows in batches for row in rows), values, strict=True):
        placed[row] = value
    return placed
