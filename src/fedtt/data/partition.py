"""Split a training set among federated clients: iid, Dirichlet label skew, or explicit label mixes.

A partition is an array of row indices into the training set, so 10,000 clients cost 10,000 small arrays, not
10,000 tables. iid is a seeded shuffle cut into equal shards; dirichlet uses flwr-datasets'
DirichletPartitioner on the local Dataset; label_skew (each client's
label mix given explicitly, as in Dec-LoRA's [[.15, .85], [.85, .15], [.5, .5]]) has no
flwr-datasets equivalent (DistributionPartitioner assigns labels to clients in a fixed
pathological pattern), so it is written here with a seeded numpy RNG.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np

KINDS = ("iid", "dirichlet", "label_skew")


def _num_labels(train: datasets.Dataset) -> int:
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(max(train["label"])) + 1


def _label_skew_shares(proportions, labels: np.ndarray, num_clients: int, num_labels: int) -> np.ndarray:
    """shares[c, y] = fraction of label y's examples that go to client c (columns sum to 1).

    Row c of `proportions` is the label mix client c should see. Splitting label y among clients
    proportional to w[c] * p[c, y] gives client c a mix proportional to p[c, y] * (N_y / mix_y),
    with mix = w @ p; that equals row c exactly when mix matches the global label distribution.
    The client weights w are fitted for this with EM (maximum likelihood for mixture weights);
    it is exact whenever the global label mix lies inside the rows' convex hull. When it does not,
    the fit is the closest mixture, and weights are floored at half an equal share so that no
    client is starved.
    """
    p = np.asarray(proportions, dtype=float)
    if p.ndim != 2 or p.shape != (num_clients, num_labels):
        raise ValueError(
            f"label_skew proportions must be {num_clients} rows (one per client) of {num_labels} label "
            f"shares each, got shape {p.shape}; fix partition.proportions"
        )
    if not np.isfinite(p).all() or (p < 0).any() or (p.sum(1) == 0).any():
        raise ValueError("label_skew proportions must be finite, >= 0 and every row must have a positive sum")
    p = p / p.sum(1, keepdims=True)
    counts = np.bincount(labels, minlength=num_labels).astype(float)
    orphan = np.flatnonzero((counts > 0) & (p.sum(0) == 0))
    if orphan.size:
        raise ValueError(
            f"label_skew proportions give label(s) {orphan.tolist()} share 0 on every client, but the "
            "training set has such examples; give each present label a positive share on some client"
        )
    target = counts / counts.sum()
    w = np.full(num_clients, 1.0 / num_clients)
    for _ in range(1000):  # EM fixed point: w_c <- w_c * sum_y target_y p_cy / mix_y
        mix = w @ p
        w = w * (p @ np.divide(target, mix, out=np.zeros_like(mix), where=mix > 0))
    w = np.maximum(w, 0.5 / num_clients)
    w /= w.sum()
    joint = w[:, None] * p
    return np.divide(joint, joint.sum(0), out=np.zeros_like(joint), where=joint.sum(0) > 0)


def _label_skew_indices(train, proportions, num_clients: int, seed: int) -> list[np.ndarray]:
    labels = np.asarray(train["label"], dtype=int)
    shares = _label_skew_shares(proportions, labels, num_clients, _num_labels(train))
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(num_clients)]
    for y in range(shares.shape[1]):
        idx = rng.permutation(np.flatnonzero(labels == y))
        if not idx.size:
            continue
        cuts = np.round(np.cumsum(shares[:, y]) * idx.size).astype(int)
        cuts[-1] = idx.size  # guard against float round-off: every example is assigned
        for c, chunk in enumerate(np.split(idx, cuts[:-1])):
            out[c] += chunk.tolist()
    return [rng.permutation(np.asarray(ix, dtype=np.int64)) for ix in out]  # do not leave labels in blocks


def partition(
    train: datasets.Dataset,
    *,
    num_clients: int,
    kind: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    proportions: list[list[float]] | None = None,
    min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Return `num_clients` disjoint arrays of row indices into `train` that together hold every row.

    kind="iid": seeded shuffle, then equal contiguous shards (the first len % n one row longer).
    kind="dirichlet": each label's examples split by Dirichlet(alpha) shares (small alpha = skewed).
    kind="label_skew": client c's label mix follows proportions[c] (one share per label id),
    as closely as the global label mix allows; see `_label_skew_shares`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown partition kind {kind!r}; use one of: {', '.join(KINDS)}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(train):
        raise ValueError(
            f"{num_clients} clients but only {len(train)} training examples; use fewer clients or more data"
        )
    if kind == "iid":
        parts = np.array_split(np.random.default_rng(seed).permutation(len(train)), num_clients)
    elif kind == "dirichlet":
        parts = _dirichlet_indices(train, num_clients, seed, alpha, min_partition_size)
    else:
        if proportions is None:
            raise ValueError("kind='label_skew' needs proportions: one row of label shares per client")
        parts = _label_skew_indices(train, proportions, num_clients, seed)

    sizes = [len(p) for p in parts]
    if min(sizes) < min_partition_size:
        raise ValueError(
            f"{kind} partition gave client sizes {sizes[:10]}{'...' if len(sizes) > 10 else ''}, below "
            f"min_partition_size={min_partition_size}; use fewer clients, more data or a less skewed setting"
        )
    return [np.asarray(p, dtype=np.int64) for p in parts]


def _dirichlet_indices(train: datasets.Dataset, num_clients: int, seed: int, alpha: float,
                       min_partition_size: int) -> list[np.ndarray]:
    # imported here: flwr_datasets takes ~1.5 s to import and `fedtt info` only needs the task list
    from flwr_datasets.partitioner import DirichletPartitioner

    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    p = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),  # flwr-datasets accepts only int/float/list/ndarray (np.float32 fails)
        min_partition_size=min_partition_size,
        self_balancing=False,
        seed=seed,
    )
    # a row-number column carries each partition's indices out through the public API
    p.dataset = train.select_columns(["label"]).add_column("row", np.arange(len(train)))
    try:
        with warnings.catch_warnings():  # it warns on every resampling try; we report the outcome
            warnings.simplefilter("ignore")
            return [np.asarray(p.load_partition(i)["row"]) for i in range(num_clients)]
    except ValueError:
        raise ValueError(
            f"dirichlet partition (alpha={alpha}) left a client below min_partition_size="
            f"{min_partition_size} after 10 tries; use a larger alpha or fewer clients"
        ) from None


def label_histograms(labels, parts: list[np.ndarray], num_labels: int) -> list[list[int]]:
    """Per-client label counts, hist[c][y], of the partitions (index arrays) of `labels`."""
    labels_all = np.asarray(labels, dtype=int)
    hists = []
    for ix in parts:
        labels = labels_all[ix]
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(f"labels must be in [0, {num_labels}), got {labels.min()}..{labels.max()}")
        hists.append(np.bincount(labels, minlength=num_labels).tolist())
    return hists
