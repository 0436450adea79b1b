"""The one local training step: every method, task kind and engine trains a client through ``train_local``.

It sees one model and one client's rows, never the federation: the caller decides which tensors train (their
``requires_grad``), the learning rate and, for DP-SGD, hands in a ``privacy.dp.LocalDP`` that brings its own
batches (Poisson samples drawn from the client's own entropy) and wraps the optimizer.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import Encoded, batch
from .evaluation import losses


def local_batches(num_examples: int, *, steps: int, epochs: int, batch_size: int,
                  generator: torch.Generator) -> list[list[int]]:
    """Index batches for one round: ``epochs`` passes over the data (each example once per pass, the last
    batch of a pass partial), else ``steps`` full batches over reshuffled passes."""
    size = min(batch_size, num_examples)
    if epochs > 0:
        return [perm[i:i + size] for _ in range(epochs)
                for perm in [torch.randperm(num_examples, generator=generator).tolist()]
                for i in range(0, num_examples, size)]
    order: list[int] = []
    batches = []
    while len(batches) < steps:
        if len(order) < size:
            order += torch.randperm(num_examples, generator=generator).tolist()
        batches.append(order[:size])
        order = order[size:]
    return batches


def client_optimizer(params, federation, lr: float) -> torch.optim.Optimizer:
    """The clients' optimizer (``federation.optimizer``), fresh each round."""
    if federation.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=federation.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=federation.momentum, weight_decay=federation.weight_decay)


def train_local(model: torch.nn.Module, data: Encoded, rows: np.ndarray, *, kind: str, federation,
                device: torch.device, lr: float, seed: int, dp=None, desc: str = "") -> float:
    """Train the model's currently trainable tensors on ``rows`` of ``data`` with a fresh optimizer; mean loss.

    ``kind``: the task kind (it decides the loss); ``federation``: the steps or epochs, batch size, optimizer,
    the head's rate, weight decay and gradient clipping. ``seed`` orders the batches and the dropout masks; with
    ``dp`` the batches are DP's Poisson samples and the optimizer Opacus' DP optimizer, everything else is the same.
    The caller's global RNG is left as it was (dropout draws from a fork)."""
    head_keys = set(getattr(model, "fedtt_head_keys", ()))
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name in head_keys else rest).append(p)
    trainable = rest + head
    head_lr = lr * federation.head_lr / federation.lr if federation.head_lr else lr  # the round's schedule too
    optimizer = client_optimizer([g for g in ({"params": rest}, {"params": head, "lr": head_lr}) if g["params"]],
                                 federation, lr)
    if dp is None:
        batches = local_batches(len(rows), steps=federation.local_steps, epochs=federation.local_epochs,
                                batch_size=federation.batch_size, generator=torch.Generator().manual_seed(seed))
    else:
        batches = dp.batches(len(rows))
    devices = [device] if device.type == "cuda" else []
    history = []
    with torch.random.fork_rng(devices=devices), (dp.attached(model, optimizer) if dp else
                                                   contextlib.nullcontext(optimizer)) as step_optimizer:
        torch.manual_seed(seed)  # dropout masks
        model.train()
        for indices in tqdm(batches, desc=desc, leave=False, disable=None):
            if not indices:  # DP-SGD's Poisson sample can be empty: the step is noise only
                dp.noise_only(step_optimizer)
                continue
            # DP-SGD's logical batch can be large: it is cut into physical chunks of batch_size, each clipped and
            # accumulated (Opacus' skip-step, as its BatchMemoryManager), and the step is taken once, so memory
            # stays bounded and the noise is added once per logical batch
            chunks = [indices] if dp is None else [indices[i:i + federation.batch_size]
                                                   for i in range(0, len(indices), federation.batch_size)]
            for i, chunk in enumerate(chunks):
                inputs, targets = batch(data, rows[chunk], device)
                loss = losses(kind, model, inputs, targets).mean()
                loss.backward()
                if federation.clip_grad_norm > 0 and dp is None:
                    torch.nn.utils.clip_grad_norm_(trainable, federation.clip_grad_norm)
                if i < len(chunks) - 1:
                    step_optimizer.signal_skip_step(True)
                step_optimizer.step()
                step_optimizer.zero_grad(set_to_none=True)
                history.append(loss.item())
    model.eval()
    return sum(history) / len(history) if history else math.nan


def learning_rate(config, server_round: int) -> float:
    """The round's learning rate: linear warm-up, then constant, linear or cosine decay to 0 at the end."""
    fed = config.federation
    if server_round <= fed.warmup_rounds:
        return fed.lr * server_round / (fed.warmup_rounds + 1)
    progress = (server_round - fed.warmup_rounds - 1) / max(1, fed.rounds - fed.warmup_rounds)
    factor = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return fed.lr * factor[fed.lr_schedule]
