"""Local DP-SGD on a client: Poisson-sampled batches, Opacus per-example clipping and Gaussian noise on exactly
the tensors that train this round, and an accountant composed over every round the client trained.

The guarantee is example-level (epsilon, delta)-DP for each client's local dataset, against anyone who sees
that client's updates (the server included), for the whole run: the client's steps of every round it took part
in are composed (RDP or PRV accountant of Opacus). Server-side client sampling gives no amplification against
the server, which knows who took part, so none is claimed. With ``target_epsilon`` the noise multiplier is
calibrated once, at the client's first round, for the planned steps (every round, ``local_steps`` each, or
``local_epochs`` passes) and kept for the run, so a client sampled in fewer rounds spends less; a client whose
next round would exceed ``target_epsilon`` (a run extended past its plan, or a fixed ``noise_multiplier`` too
small) refuses to train, and the run says so.

The client's secrets are its own: the Poisson batches and the Gaussian noise come from two generators seeded
from the client's operating-system entropy (64 bits each; the noise generator lives on the parameters' device),
so nothing the server knows (the config seed, the round, the partition) reproduces them. Opacus' ``secure_mode``
needs torchcsprng, which has no build for this torch, so the streams themselves are pseudo-random (MT19937 on CPU,
Philox on CUDA) from a secret seed. ``privacy.reproducible_noise = true`` derives both seeds from the run seed
instead: a seed then reproduces a private run, and the guarantee no longer holds against the server (results.json
and the run summary say so). The noise multiplier and the steps taken are the client's own record: a server that
reports more earlier steps (a client whose state was lost) can only raise the epsilon the client accounts.

Hooks are attached for the client's step and removed after it, with every attribute Opacus adds, because the
in-process engine shares one model between the server and all clients (leftovers silently corrupt the next
client's per-example gradients).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord

from ..files import atomic_write

STATE = "fedtt-dp"  # context.state record: this client's noise multiplier and the DP-SGD steps it has taken
NOISE_SALT = 0x5DEECE66D  # reproducible_noise: the noise seed differs from the sampling seed
MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks")


class PrivacyBudgetExhausted(ValueError):
    pass


def default_delta(num_examples: int) -> float:
    """Below 1/n, as (epsilon, delta)-DP needs to mean anything: 1e-5, or 1/(10 n) for larger datasets."""
    return min(1e-5, 1.0 / (10 * num_examples))


def steps_per_round(federation, sample_rate: float) -> int:
    """``local_steps``, or ``local_epochs`` passes of 1 / q Poisson steps each."""
    return federation.local_epochs * math.ceil(1 / sample_rate) if federation.local_epochs else federation.local_steps


def epsilon(accountant: str, sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """The (epsilon at delta) of ``steps`` DP-SGD steps, by Opacus' accountant."""
    if steps == 0:
        return 0.0
    if sigma == 0:  # clipping without noise: no guarantee (Opacus would say so too, with a warning per call)
        return math.inf
    acc = _accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def calibrated_sigma(accountant: str, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose ``steps`` steps stay within the target."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01))


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


class LocalDP:
    """One client's DP-SGD for one round."""

    def __init__(self, privacy, federation, num_examples: int, rounds: int, prior: tuple[float, int] | None,
                 device: torch.device, seed: int | None = None):
        """``prior``: (noise multiplier, DP-SGD steps) of the client's earlier rounds in this run, if any;
        ``seed``: only with ``privacy.reproducible_noise`` (else the OS's entropy seeds the generators)."""
        self.privacy, self.n = privacy, num_examples
        # q: privacy.sample_rate, else batch_size / n; the expected (logical) batch q n, in physical chunks of
        # batch_size (train_local)
        self.sample_rate = privacy.sample_rate or min(federation.batch_size, num_examples) / num_examples
        self.batch_size = max(1, round(self.sample_rate * num_examples))
        self.steps = steps_per_round(federation, self.sample_rate)
        self.delta = privacy.delta if privacy.delta is not None else default_delta(num_examples)
        if self.delta >= 1.0 / num_examples:
            raise ValueError(f"privacy.delta = {self.delta:g} is not below 1/n = {1 / num_examples:g} for a client "
                             f"with {num_examples} examples; use a smaller delta (or leave it unset)")
        self.sigma, self.prior_steps = prior if prior is not None else (None, 0)
        if self.sigma is None:
            self.sigma = privacy.noise_multiplier if privacy.noise_multiplier is not None else calibrated_sigma(
                privacy.accountant, privacy.target_epsilon, self.delta, self.sample_rate, rounds * self.steps)
        self.record: Path | None = None  # the site's record file (for_round)
        sampling, noise = (secrets.randbits(63), secrets.randbits(63)) if seed is None else (seed, seed ^ NOISE_SALT)
        self.sampling = torch.Generator().manual_seed(sampling)
        self.noise = torch.Generator(device=device).manual_seed(noise)
        after = self.epsilon(self.prior_steps + self.steps)
        if privacy.target_epsilon is not None and after > privacy.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted: this round would bring epsilon to {after:.3f} > privacy.target_epsilon = "
                f"{privacy.target_epsilon:g} (after {self.prior_steps} DP-SGD steps); the client does not train")

    @classmethod
    def for_round(cls, privacy, federation, context, num_examples: int, server_steps: int, device: torch.device,
                  seed: int, record: Path | None = None) -> LocalDP:
        """The round's DP-SGD from the client's own record (noise multiplier, steps so far): its state, or the
        file ``record`` on its own disk (a site's node config ``dp-record``: it survives a restart), whichever
        counts more. ``server_steps``, the server's count of this client's earlier steps, is used only where it
        is larger (the client lost both): it can raise the accounted epsilon, never lower it or set the noise."""
        own = context.state[STATE] if STATE in context.state.config_records else None
        saved = json.loads(record.read_text()) if record is not None and record.is_file() else None
        own = max((r for r in (own, saved) if r), key=lambda r: int(r["steps"]), default=None)
        steps = max(int(own["steps"]) if own else 0, server_steps)
        sigma = float(own["sigma"]) if own else None
        prior = None if sigma is None and steps == 0 else (sigma, steps)
        dp = cls(privacy, federation, num_examples, federation.rounds, prior, device,
                 seed if privacy.reproducible_noise else None)
        dp.record = record
        return dp

    def epsilon(self, steps: int) -> float:
        return epsilon(self.privacy.accountant, self.sigma, self.sample_rate, steps, self.delta)

    def batches(self, num_examples: int) -> list[list[int]]:
        """Poisson sampling: each example is in each step's batch independently with probability q."""
        return [(torch.rand(num_examples, generator=self.sampling) < self.sample_rate).nonzero().reshape(-1).tolist()
                for _ in range(self.steps)]

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Per-example gradient hooks on the modules that train now, and Opacus' DP optimizer around
        ``optimizer`` (per-group clipping with ``privacy.head_grad_norm``); on exit the model is as before."""
        from opacus.grad_sample import GradSampleModule

        head = {id(p) for n, p in model.named_parameters() if n in getattr(model, "fedtt_head_keys", ())}
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        # the groups that train this round: a head-only round has one, so its head gets noise for its clip alone
        present = sorted({int(id(p) in head) for p in trained}) if self.privacy.head_grad_norm else [0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
            try:
                yield _group_clipped_optimizer()(
                    optimizer, [self.group_norms[g] for g in present],
                    lambda p: present.index(int(id(p) in head)) if self.privacy.head_grad_norm else 0,
                    noise_multiplier=self.sigma, expected_batch_size=self.batch_size, loss_reduction="mean",
                    generator=self.noise)
            finally:
                _detach(wrapped)

    @property
    def group_norms(self) -> list[float]:
        """Clipping norms: [adapter, head] with ``head_grad_norm``, else one for every trained tensor."""
        head = self.privacy.head_grad_norm
        return [self.privacy.max_grad_norm] + ([head] if head else [])

    def noise_only(self, optimizer) -> None:
        """An empty Poisson batch still takes a step: zero per-example gradients, so the update is noise."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def finish(self, context) -> dict[str, float | int]:
        """Record the round's steps in the client's state; the metrics its reply carries."""
        total = self.prior_steps + self.steps
        context.state[STATE] = ConfigRecord({"sigma": self.sigma, "steps": total})
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.record, json.dumps({"sigma": self.sigma, "steps": total}))
        return {"epsilon": self.epsilon(total), "delta": self.delta, "dp-steps": total,
                "noise-multiplier": self.sigma, "sample-rate": self.sample_rate}


@lru_cache(maxsize=1)
def _group_clipped_optimizer():
    """Opacus' DPOptimizer with each example's gradient clipped per group of tensors (group g to its own norm C_g)
    and each group noised for its own clip: std sigma * sqrt(k) * C_g with k groups (those that train). Whitened
    (group g divided by sigma sqrt(k) C_g), this releases the sum with unit noise and a sensitivity of
    sqrt(k / (k sigma^2)) = 1 / sigma: the Gaussian mechanism of multiplier sigma, so the accountant's epsilon is
    unchanged. A small-gradient group (the adapter) thus gets noise on its own scale, not the head's (which one
    joint clip, or Opacus' per-layer clipping with its one noise std, would give it). With one group this is
    Opacus' flat clipping."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    class GroupClippedOptimizer(DPOptimizer):
        def __init__(self, optimizer, group_norms: list[float], group_of, **kwargs):
            super().__init__(optimizer, max_grad_norm=math.sqrt(sum(c * c for c in group_norms)), **kwargs)
            self.group_norms = group_norms
            self.group_of = [group_of(p) for p in self.params]

        def noise_std(self, group: int) -> float:
            return self.noise_multiplier * math.sqrt(len(self.group_norms)) * self.group_norms[group]

        def add_noise(self):
            for p, g in zip(self.params, self.group_of):
                _check_processed_flag(p.summed_grad)
                noise = _generate_noise(std=self.noise_std(g), reference=p.summed_grad, generator=self.generator,
                                        secure_mode=self.secure_mode)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

        def clip_and_accumulate(self):
            samples = self.grad_samples
            squares: dict[int, torch.Tensor] = {}
            for g, sample in zip(self.group_of, samples):
                squares[g] = squares.get(g, 0) + sample.flatten(1).float().pow(2).sum(-1)
            factors = {g: (self.group_norms[g] / (s.sqrt() + 1e-6)).clamp(max=1.0) for g, s in squares.items()}
            for p, g in zip(self.params, self.group_of):
                _check_processed_flag(p.grad_sample)
                sample = self._get_flat_grad_sample(p).to(p.dtype)
                grad = torch.einsum("i,i...", factors[g].to(sample.device, p.dtype), sample)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)

    return GroupClippedOptimizer


def _detach(wrapped) -> None:
    model = wrapped.to_standard_module()
    from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS

    for module in model.modules():
        for attr in MODULE_ATTRS:
            module.__dict__.pop(attr, None)
    for p in model.parameters():
        for attr in (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad"):
            p.__dict__.pop(attr, None)
        p.grad = None


def check_delta(privacy, partition_sizes: list[int]) -> None:
    """Before a run: a configured delta must be below 1/n for every client (else the guarantee is void)."""
    if privacy.dp and privacy.delta is not None and partition_sizes:
        smallest = min(partition_sizes)
        if privacy.delta >= 1.0 / smallest:
            raise ValueError(f"privacy.delta = {privacy.delta:g} is not below 1/n = {1 / smallest:g} for the smallest "
                             f"client ({smallest} examples); use a smaller delta (or leave it unset)")
