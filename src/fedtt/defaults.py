"""Per-method defaults: the one place where the methods' own settings live.

A config key listed here and not set by the user takes the value of the run's method, so every method runs
with its own tuned settings on the same data, splits and budget. Values were chosen on the *validation*
split by ``fedtt tune`` (the command and the table it chose from: docs/results.md, "Choosing the defaults");
test labels played no part.

Keys are dotted config keys (``federation.lr``); ``adapter.*`` keys also serve ``fedtt.AdapterConfig`` used
as a library (its ``None`` fields are filled from the adapter method's row).
"""

from __future__ import annotations

# method -> {dotted config key: value}. Learning rates (and FedTT's adapter biases) from `bash bench/results.sh
# tune-fedtt tune-lora`: grid lr 1e-3, 3e-3, 1e-2 (x biases on/off for FedTT), --quick, Rotten Tomatoes,
# Dirichlet 0.5, seeds 0 and 1; mean validation accuracy of the chosen points: FedTT 0.696 (biases off; on:
# 0.648), LoRA 0.739 (1e-2 diverges to the majority class), FFA-LoRA 0.703. FedTT+ shares FedTT's row (not
# tuned on its own). Ranks are not tuned: 5 is LoRETTA's TT rank, 8 the LoRA rank the paper compares with.
METHOD_DEFAULTS: dict[str, dict[str, object]] = {
    "fedtt": {"federation.lr": 1e-2, "adapter.rank": 5, "adapter.train_biases": False, "adapter.train_norms": False},
    "fedtt+": {"federation.lr": 1e-2, "adapter.rank": 5, "adapter.train_biases": False, "adapter.train_norms": False},
    "lora": {"federation.lr": 1e-3, "adapter.rank": 8, "adapter.train_norms": False},
    "ffa-lora": {"federation.lr": 1e-2, "adapter.rank": 8, "adapter.train_norms": False},
    # Not yet tuned here (fedtt tune has not been run for them): the sources' values. VeRA: rank 256 is
    # VeraConfig's default (and the VeRA paper's for RoBERTa-large), and its scaling vectors train at a larger rate
    # than LoRA's (the paper's are of the order of 1e-2). (IA)^3: 3e-3, the rate of its paper (T-Few, Liu et al.
    # 2022); no rank. Fed-SB: its R (r^2 values a layer) grows with r but not with the model, so the paper uses
    # ranks well above LoRA's; 32 (1,024 values a layer, a sixth of LoRA r=8's on MiniLM's q, v) with FFA-LoRA's
    # rate, since both train one factor over frozen seeded ones.
    "vera": {"federation.lr": 1e-2, "adapter.rank": 256, "adapter.train_norms": False},
    "ia3": {"federation.lr": 3e-3, "adapter.train_norms": False},
    "fed-sb": {"federation.lr": 1e-2, "adapter.rank": 32, "adapter.train_norms": False},
}


# Under privacy.dp = true (local DP-SGD) on a classification task, these rows come before the rows above for every
# key the config does not set (docs/privacy.md, "DP defaults", with the runs they were chosen from). The shared
# recipe: a large Poisson batch (q = 0.1 of each client, trained in physical chunks of 64) and few steps a round,
# where subsampling amplifies the budget most; round 1 trains the head alone (a private linear probe); the head
# is clipped to its own norm and the adapter near its own per-example gradient norm at init (FedTT's ~0.01, LoRA's
# ~0.07), so the head's gradients do not spend the adapter's clipping budget. The learning rate per method was
# chosen on validation under DP at epsilon 8, seed 0, 15 rounds, by the best validation accuracy over the rounds
# (FedTT at clip 0.01: lr 3e-3 0.572, 1e-2 0.668, 3e-2 0.694; LoRA at clip 0.05: 3e-4 0.582, 1e-3 0.574, 3e-3
# 0.558, the majority rate). Both choices are at their grid's edge; the next rates (1e-1, 1e-4) were not run.
# FedTT+ shares FedTT's row and FFA-LoRA LoRA's clip at its own non-private rate: neither was run under DP.
DP_RECIPE: dict[str, object] = {
    "privacy.sample_rate": 0.1, "federation.batch_size": 64, "federation.local_steps": 5,
    "federation.head_only_rounds": 1, "privacy.head_grad_norm": 1.0, "federation.head_lr": 1e-2,
    "federation.lr_schedule": "constant",
}
DP_DEFAULTS: dict[str, dict[str, object]] = {
    "fedtt": {**DP_RECIPE, "federation.lr": 3e-2, "privacy.max_grad_norm": 0.01},
    "fedtt+": {**DP_RECIPE, "federation.lr": 3e-2, "privacy.max_grad_norm": 0.01},
    "lora": {**DP_RECIPE, "federation.lr": 3e-4, "privacy.max_grad_norm": 0.05},
    "ffa-lora": {**DP_RECIPE, "federation.lr": 1e-2, "privacy.max_grad_norm": 0.05},
}


def method_default(method: str, key: str):
    """The default of ``key`` for ``method`` (``fedtt+`` adapters are ``fedtt`` adapters), or None."""
    return METHOD_DEFAULTS.get(method, {}).get(key)
