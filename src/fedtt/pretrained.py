"""A run's adapter as a ready model in one call: ``fedtt.load_pretrained(<out>/adapter)``.

The adapter directory's ``fedtt.json`` names the backbone (and its truncation), the task kind, the labels and,
for a templated instruction task, the template; ``load_pretrained`` rebuilds the backbone, injects and loads
the adapter, and offers ``classify`` (a classifier's softmax, or a decoder's label likelihood) and
``generate`` (greedy decoding) on the configured device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import load_adapter, read_adapter_config
from .data.instructions import fill
from .learning.batches import prompt_ids
from .learning.evaluation import generate, label_scores
from .models import load_backbone, resolve_device


@dataclass
class Pretrained:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    saved: dict  # fedtt.json

    @property
    def kind(self) -> str:
        return self.saved.get("kind", "classification")

    @torch.no_grad()
    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """The most likely label of each text and its probability."""
        names = self.saved["label_names"]
        if self.kind == "classification":
            batch = self.tokenizer(list(texts), padding=True, truncation=True,
                                   max_length=self.saved.get("max_length", 64), return_tensors="pt").to(self.device)
            probabilities = self.model(**batch).logits.float().softmax(-1)
        else:
            if not self.saved.get("label_words"):
                raise ValueError("this adapter was trained on open-ended instructions, it has no labels to predict; "
                                 "use `fedtt generate`")
            prompts = [prompt_ids(self.tokenizer, fill(self.saved["template"], self.saved["label_words"], t))
                       for t in texts]
            scores = label_scores(self.model, self.tokenizer, prompts, self.saved["label_words"], self.device,
                                  self.saved.get("max_length", 64), 16)
            probabilities = torch.tensor(scores).softmax(-1)
        return [(names[int(p.argmax())], float(p.max())) for p in probabilities]

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        if self.kind != "instruction":
            raise ValueError("this adapter belongs to a classifier, which does not generate; use `fedtt predict`")
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        return generate(self.model, self.tokenizer, ids, self.device,
                        max_new_tokens or self.saved.get("max_new_tokens", 16), 16)


def load_pretrained(directory, device: str = "auto") -> Pretrained:
    saved = read_adapter_config(directory)
    target = resolve_device(device)
    causal = saved.get("kind") == "instruction"
    model, tokenizer = load_backbone(saved["model"], num_labels=len(saved.get("label_names") or []) or 1,
                                     num_hidden_layers=saved.get("num_hidden_layers", 0), causal_lm=causal)
    load_adapter(model, directory)
    return Pretrained(model.to(target).eval(), tokenizer, target, saved)
