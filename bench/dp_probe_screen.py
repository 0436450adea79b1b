"""A cheap screen of DP settings: the private linear probe (the head alone) on the frozen encoder's features.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dp_probe_screen.py [--config configs/demo.toml] [--seeds 0,1,2]
        [--rounds 15] [--steps 5] [--epsilon 8] [--set optimizer=adamw,lr=1e-2,server=sgd ...]

A head-only DP run (``federation.head_only_rounds`` = rounds) trains nothing but the classifier on the pooled
features of a frozen encoder, so those features can be computed once and the federation replayed on them in
seconds instead of 20 minutes a run. Each client's rounds use fedtt's own DP-SGD (``privacy.dp.LocalDP``: its
Poisson batches, Opacus' clipping and noise, the calibrated multiplier), the clients' optimizer
(``learning.train.client_optimizer``) and the server's step from ``federated.server_opt``, on each seed's real
split. It leaves out dropout and the encoder's (unused) gradients, so it ranks settings; the real runs decide
(``bench/results.sh dp-recipe-eps8-head*``). It prints the best and last validation accuracy per seed for each
setting; test labels are not read.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fedtt.adapters.placement import is_head
from fedtt.config import load_config
from fedtt.federated.server_opt import ServerOptimizer
from fedtt.federated.task import experiment, run_config_for
from fedtt.learning.batches import batch
from fedtt.learning.train import client_optimizer
from fedtt.privacy.dp import LocalDP


def features(exp, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled features the head reads (eval mode: no dropout) and the labels, for every row of ``data``."""
    encoder = getattr(exp.model, exp.model.base_model_prefix)
    out, labels = [], []
    with torch.no_grad():
        for start in range(0, len(data.labels), 256):
            inputs, targets = batch(data, np.arange(start, min(start + 256, len(data.labels))), exp.device)
            out.append(encoder(**inputs).pooler_output.float().cpu())
            labels.append(targets.cpu())
    return torch.cat(out), torch.cat(labels)


def replay(cfg, head: torch.nn.Linear, train, validation, partitions, noise_seed: int) -> list[float]:
    """Validation accuracy after each round of a head-only DP federation of ``cfg`` on the features."""
    fed, privacy = cfg.federation, cfg.privacy
    x, y = train
    server = ServerOptimizer.of(fed)
    weights = np.array([len(p) for p in partitions], dtype=float) / sum(len(p) for p in partitions)
    records = [None] * len(partitions)  # each client's (noise multiplier, steps so far)
    accuracies = []
    for _ in range(fed.rounds):
        start = {k: v.detach().clone() for k, v in head.state_dict().items()}
        mean = {k: np.zeros(v.shape) for k, v in start.items()}
        for c, (rows, weight) in enumerate(zip(partitions, weights, strict=True)):
            head.load_state_dict(start)
            dp = LocalDP(privacy, fed, len(rows), fed.rounds, records[c], torch.device("cpu"),
                         seed=noise_seed * 1000 + c * 100 + len(accuracies))
            with dp.attached(head, client_optimizer(head.parameters(), fed, fed.lr)) as step_optimizer:
                for indices in dp.batches(len(rows)):
                    if not indices:
                        dp.noise_only(step_optimizer)
                        continue
                    chunk = torch.as_tensor(rows)[indices]
                    torch.nn.functional.cross_entropy(head(x[chunk]), y[chunk]).backward()
                    step_optimizer.step()
                    step_optimizer.zero_grad(set_to_none=True)
            records[c] = (dp.sigma, dp.prior_steps + dp.steps)
            for k, v in head.state_dict().items():
                mean[k] += weight * (v - start[k]).double().numpy()
        step, state = server.step(mean)
        server.accept(state)
        head.load_state_dict({k: start[k] + torch.as_tensor(step[k], dtype=start[k].dtype) for k in start})
        with torch.no_grad():
            accuracies.append((head(validation[0]).argmax(1) == validation[1]).float().mean().item())
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--noise-draws", type=int, default=2, help="noise and sampling draws per seed")
    parser.add_argument("--set", action="append", dest="settings", metavar="optimizer=O,lr=R,server=S",
                        help="a setting to screen (repeatable); server: sgd or momentum (0.9)")
    args = parser.parse_args()
    settings = args.settings or ["optimizer=adamw,lr=1e-2,server=sgd", "optimizer=adamw,lr=3e-2,server=sgd",
                                 "optimizer=adamw,lr=3e-2,server=momentum", "optimizer=sgd,lr=3,server=momentum"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        exp = experiment(run_config_for(load_config(args.config, [f"seed={seed}", "privacy.dp=false"]), "/unused"))
        exp.model.eval()
        train, validation = features(exp, exp.train), features(exp, exp.validation)
        majority = max(validation[1].float().mean().item(), 1 - validation[1].float().mean().item())
        classifier = next(m for n, m in exp.model.named_modules() if is_head(n))
        print(f"seed {seed}: validation majority rate {majority:.3f}; clients {[len(p) for p in exp.partitions]}")
        for setting in settings:
            given = dict(item.split("=") for item in setting.split(","))
            cfg = load_config(args.config, [
                f"seed={seed}", "privacy.dp=true", "privacy.dp_defaults=false", f"federation.rounds={args.rounds}",
                f"federation.local_steps={args.steps}", "privacy.sample_rate=0.1", "federation.batch_size=64",
                f"privacy.target_epsilon={args.epsilon}", "privacy.max_grad_norm=1.0", "privacy.delta=1e-5",
                f"federation.optimizer='{given['optimizer']}'", f"federation.lr={given['lr']}",
                f"federation.server_optimizer='{given['server']}'"])
            runs = []
            for draw in range(args.noise_draws):
                head = torch.nn.Linear(classifier.in_features, classifier.out_features)
                head.load_state_dict(classifier.state_dict())  # the run's seeded initial head
                runs.append(replay(cfg, head, train, validation, exp.partitions, draw))
            best = ", ".join(f"{max(r):.3f}" for r in runs)
            last = ", ".join(f"{r[-1]:.3f}" for r in runs)
            print(f"  {setting:42s} best {best}   last {last}", flush=True)


if __name__ == "__main__":
    main()
