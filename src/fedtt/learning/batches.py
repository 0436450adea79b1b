"""Tokenised splits and padded batches: every dataset is tokenised once, batches are cut from the token ids.

Classification examples are the text's token ids and a class id. Instruction examples are the prompt (through
the tokenizer's chat template when it has one) followed by the response and an end-of-turn token; the loss
sees only the response, and truncation shortens the response last (the prompt's start goes first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # cross-entropy's ignore_index: prompt and padding positions of instruction targets


@dataclass
class Encoded:
    """One split, tokenised: per example the token ids, the class id (-1: none) and, for instruction data,
    where the response starts (``None`` for classification)."""

    input_ids: list[list[int]]
    labels: list[int]
    response_start: list[int] | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, rows) -> Encoded:
        rows = [int(r) for r in rows]
        return Encoded([self.input_ids[r] for r in rows], [self.labels[r] for r in rows],
                       None if self.response_start is None else [self.response_start[r] for r in rows], self.pad_id)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as the model sees it before its answer: the chat template's user turn and assistant header."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + "\n")["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    """A response and the token that ends the turn (so generation learns to stop)."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], int]:
    """``prompt + response`` in at most ``max_length`` tokens, and where the response starts: the response
    keeps all but the quarter of the budget reserved for the prompt's end; the prompt loses its start first."""
    keep = response[: max_length - min(len(prompt), max_length // 4)]
    prompt = prompt[max(0, len(prompt) + len(keep) - max_length):]
    return prompt + keep, len(prompt)


def encode_classification(texts: list[str], labels: list[int], tokenizer, max_length: int) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, [int(y) for y in labels], None, tokenizer.pad_token_id)


def encode_instruction(prompts: list[str], responses: list[str], labels: list[int], tokenizer,
                       max_length: int) -> Encoded:
    fitted = [fit(prompt_ids(tokenizer, p), response_ids(tokenizer, r), max_length) for p, r in zip(prompts, responses)]
    return Encoded([ids for ids, _ in fitted], [int(y) for y in labels], [start for _, start in fitted],
                   tokenizer.pad_token_id)


def pad(sequences: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of equal-length rows (left padding: for generation)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def batch(data: Encoded, rows, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs and targets for ``rows``: class ids, or token ids with the prompt and padding ignored."""
    rows = [int(r) for r in rows]
    ids, mask = pad([data.input_ids[r] for r in rows], data.pad_id)
    if data.response_start is None:
        targets = torch.tensor([data.labels[r] for r in rows], dtype=torch.long)
    else:
        targets = ids.clone()
        for i, r in enumerate(rows):
            targets[i, : data.response_start[r]] = IGNORE
        targets[mask == 0] = IGNORE
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, targets.to(device)
