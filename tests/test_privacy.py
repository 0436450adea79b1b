"""Local DP-SGD (Opacus, our accountant bookkeeping) and secure aggregation (SecAgg+ on Flower messages), on real
MiniLM federations: what is reported equals the accountant, clipping and noise hit exactly the round's tensors,
nothing is left on the shared model, the masked sum equals the plain one, uploads are masked, dropouts heal."""

import copy
import json
import logging

import conftest
import numpy as np
import pytest
import torch
from conftest import client_app_with
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.torch import load_file

import fedtt
from fedtt.config import load_config
from fedtt.engines.inprocess import run_inprocess
from fedtt.federated import client_app as real_client
from fedtt.federated.server_app import app as server_app
from fedtt.federated.task import experiment, run_config_for
from fedtt.learning.batches import batch
from fedtt.learning.evaluation import losses
from fedtt.learning.train import local_batches
from fedtt.models import load_backbone
from fedtt.privacy import secure_aggregation
from fedtt.privacy.dp import LocalDP, epsilon
from fedtt.privacy.secagg import SecAggParams
from fedtt.run import run

FAST = [*conftest.FAST, "task.max_eval_examples=40", "federation.rounds=1"]
SECURE = ["privacy.secure_aggregation=true", "federation.min_replies=3"]


def config(*overrides):
    return load_config(None, FAST + list(overrides))


@pytest.mark.parametrize("accountant, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_our_epsilon_is_opacus_accountant_composed_over_every_step(accountant, cls):
    sigma, q, steps, delta = 0.9, 16 / 2843, 60, 1e-5
    reference = cls()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(accountant, sigma, q, steps, delta) == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-6)
    assert epsilon(accountant, sigma, q, 2 * steps, delta) > epsilon(accountant, sigma, q, steps, delta)


def test_a_dp_run_reports_each_clients_epsilon_of_the_whole_run(tmp_path):
    results = run(config("federation.rounds=2", "privacy.dp=true", "privacy.target_epsilon=4.0"), tmp_path)
    privacy = results["privacy"]
    for pid, eps in privacy["epsilon"].items():
        steps = 2 * 2  # rounds x local steps
        expected = epsilon("rdp", privacy["noise_multiplier"][pid], privacy["sample_rate"][pid], steps,
                           privacy["delta"][pid])
        assert eps == pytest.approx(expected, rel=1e-9) and eps <= 4.0
        assert privacy["delta"][pid] == 1e-5
    assert privacy["epsilon_max"] == max(privacy["epsilon"].values())
    assert results["rounds"][0]["epsilon_max"] < results["rounds"][1]["epsilon_max"]  # composed, not per round


@pytest.fixture(scope="module")
def exp():
    # one clipping norm over every trained tensor, at the config's batch: not the DP defaults' per-group recipe
    return experiment(run_config_for(config("privacy.dp=true", "privacy.dp_defaults=false",
                                            "privacy.noise_multiplier=0.0", "privacy.max_grad_norm=0.05"), "/unused"))


def snapshot(model):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
            "hooks": {n: (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks),
                          len(getattr(m, "_backward_pre_hooks", {}))) for n, m in model.named_modules()},
            "param_attrs": {n: sorted(vars(p)) for n, p in model.named_parameters()}}


def dp_for(exp, **overrides):
    privacy = exp.config.privacy.model_copy(update=overrides)
    return LocalDP(privacy, exp.config.federation, 64, rounds=1, prior=None, device=exp.device, seed=0)


@pytest.fixture
def no_dropout(exp):
    """Per-example gradients are compared with one-example passes: the same function needs no dropout."""
    dropouts = [m for m in exp.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    yield
    for m, p in zip(dropouts, rates):
        m.p = p


def test_clipped_per_example_gradients_are_exact_and_within_the_norm(exp, no_dropout):
    model, rows = exp.model, exp.partitions[0][:6]
    dp = dp_for(exp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    inputs, targets = batch(exp.train, rows, exp.device)
    expected = []  # each example alone, its gradient clipped to C: what DP-SGD sums
    for i in range(len(rows)):
        model.zero_grad()
        losses("classification", model, {k: v[i:i + 1] for k, v in inputs.items()}, targets[i:i + 1]).sum().backward()
        grads = [p.grad.detach().clone() for p in trainable]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        assert norm > dp.privacy.max_grad_norm  # so clipping really acts
        expected.append([g * min(1.0, dp.privacy.max_grad_norm / (norm.item() + 1e-6)) for g in grads])
    model.zero_grad()
    before = snapshot(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)  # as federation.weight_decay
    model.train()
    with dp.attached(model, optimizer) as dp_optimizer:
        losses("classification", model, inputs, targets).mean().backward()
        dp_optimizer.clip_and_accumulate()
        for p, *per_example in zip(trainable, *expected):
            torch.testing.assert_close(p.summed_grad, sum(per_example), rtol=1e-4, atol=1e-7)
        norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in example)) for example in expected])
        assert (norms <= dp.privacy.max_grad_norm * (1 + 1e-5)).all()
    model.eval()
    after = snapshot(model)  # hooks and every attribute Opacus added are gone; weights as they were
    assert after["hooks"] == before["hooks"] and after["attrs"] == before["attrs"]
    assert after["param_attrs"] == before["param_attrs"]
    assert all(torch.equal(after["params"][n], v) for n, v in before["params"].items())


@pytest.mark.parametrize("method", ["fedtt", "lora"])
def test_a_dp_step_moves_exactly_the_rounds_trainable_tensors(method):
    base, tokenizer = load_backbone("minilm", num_labels=2, num_hidden_layers=1, seed=0)
    model = fedtt.inject(base, fedtt.AdapterConfig(method=method))
    params = dict(model.named_parameters())
    frozen_core = next((n for n in model.fedtt_trainable if n.endswith("up.core_0")), None)
    if frozen_core:
        params[frozen_core].requires_grad_(False)  # FedTT+: a frozen core is neither clipped, noised nor moved
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in params.items()}
    privacy = load_config(None, ["privacy.dp=true", "privacy.noise_multiplier=1.0"]).privacy
    dp = LocalDP(privacy, load_config(None, []).federation, 50, rounds=1, prior=None, device=torch.device("cpu"))
    texts = tokenizer(["a fine film", "dull", "gripping", "a mess"], padding=True, return_tensors="pt")
    model.train()
    with dp.attached(model, torch.optim.AdamW(trainable, lr=1e-2)) as optimizer:
        torch.nn.functional.cross_entropy(model(**texts).logits, torch.tensor([1, 0, 1, 0])).backward()
        optimizer.step()
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in params.items() if p.requires_grad}
    assert frozen_core is None or frozen_core not in moved


def test_without_noise_or_clipping_dp_sgd_is_plain_training_on_the_same_poisson_batches(exp, no_dropout):
    model = exp.model
    rows = exp.partitions[0]
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dp = dp_for(exp, max_grad_norm=1e9)
    exp.train_local(exp.train, rows, seed=5, lr=1e-3, dp=dp)
    private = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fedtt.load_trainable_state_dict(model, initial)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)  # as federation.weight_decay
    batches = dp_for(exp, max_grad_norm=1e9).batches(len(rows))  # the same seed: the same Poisson batches
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model.train()
        for indices in batches:
            if indices:
                inputs, targets = batch(exp.train, rows[indices], exp.device)
                # DP-SGD divides the summed gradient by the expected batch size, not by the Poisson sample's
                (losses("classification", model, inputs, targets).sum() / dp.batch_size).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    for name, value in private.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], value, rtol=1e-4, atol=1e-6)
    fedtt.load_trainable_state_dict(model, initial)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_dp_off_is_the_plain_training_loop_bit_for_bit(optimizer):
    cfg = config(f"federation.optimizer='{optimizer}'", *(["federation.momentum=0.9"] if optimizer == "sgd" else []))
    exp = experiment(run_config_for(cfg, "/unused"))
    initial = {n: p.detach().clone() for n, p in exp.model.named_parameters() if p.requires_grad}
    rows = exp.partitions[1]
    loss = exp.train_local(exp.train, rows, seed=3, lr=1e-3)
    ours = {n: p.detach().clone() for n, p in exp.model.named_parameters() if p.requires_grad}
    fedtt.load_trainable_state_dict(exp.model, initial)
    trainable = [p for p in exp.model.parameters() if p.requires_grad]
    optimizer = (torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0) if optimizer == "adamw" else
                 torch.optim.SGD(trainable, lr=1e-3, momentum=0.9))
    generator = torch.Generator().manual_seed(3)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        exp.model.train()
        for indices in local_batches(len(rows), steps=2, epochs=0, batch_size=8, generator=generator):
            inputs, targets = batch(exp.train, rows[indices], exp.device)
            value = losses("classification", exp.model, inputs, targets).mean()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(value.item())
    exp.model.eval()
    assert loss == sum(history) / len(history)
    assert all(torch.equal(ours[n], p) for n, p in exp.model.named_parameters() if p.requires_grad)
    fedtt.load_trainable_state_dict(exp.model, initial)


def test_clipping_without_noise_trains_and_states_an_infinite_epsilon(tmp_path):
    results = run(config("privacy.dp=true", "privacy.noise_multiplier=0"), tmp_path)
    assert results["status"] == "finished"
    assert json.loads((tmp_path / "results.json").read_text())["privacy"]["epsilon_max"] is None  # strict JSON
    assert "epsilon inf" in (tmp_path / "results.md").read_text()


def test_a_federation_under_the_dp_defaults_probes_the_head_first_and_stays_within_its_budget(tmp_path):
    """privacy.dp with the DP defaults (only the Poisson rate made small for speed): round 1 trains and sends the head
    alone, round 2 the whole adapter, and every client's epsilon for the run stays within the target."""
    cfg = config("privacy.dp=true", "privacy.dp_defaults=true", "privacy.sample_rate=0.01", "federation.rounds=2",
                 "privacy.target_epsilon=8")
    assert (cfg.privacy.head_grad_norm, cfg.privacy.max_grad_norm, cfg.federation.head_only_rounds) == (1.0, 0.01, 1)
    results = run(cfg, tmp_path)
    head = conftest.head_values(cfg.adapter)
    first, second = results["rounds"]
    assert first["params_up"] == 3 * head and second["params_up"] == 3 * results["trainable_params"]
    assert results["status"] == "finished" and 0 < results["privacy"]["epsilon_max"] <= 8.0
    assert first["epsilon_max"] < second["epsilon_max"]


def test_the_head_takes_its_own_rate_and_the_adapter_is_trained_as_without_it():
    exp = experiment(run_config_for(config("federation.local_steps=1", "federation.lr=1e-3"), "/unused"))
    initial = {n: p.detach().clone() for n, p in exp.model.named_parameters() if p.requires_grad}

    def moved(head_lr):
        fedtt.load_trainable_state_dict(exp.model, initial)
        exp.config.federation.head_lr = head_lr
        exp.train_local(exp.train, exp.partitions[0], seed=3, lr=1e-3)
        return {n: (p.detach() - initial[n]).abs().max().item() for n, p in exp.model.named_parameters()
                if p.requires_grad}

    same, fast = moved(None), moved(1e-2)
    head = set(exp.model.fedtt_head_keys)
    # AdamW's first step moves every coordinate with a gradient by its rate (m / sqrt(v) = +-1)
    assert all(fast[n] == pytest.approx(1e-2, rel=1e-3) and same[n] == pytest.approx(1e-3, rel=1e-3) for n in head)
    assert all(fast[n] == same[n] for n in fast if n not in head)
    exp.config.federation.head_lr = None
    fedtt.load_trainable_state_dict(exp.model, initial)


# ------------------------------------------------------------------------------------- secure aggregation

def first_round_update(out):
    """The global adapter after round 1 minus the seeded init (what the round aggregated)."""
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def masked_and_plain(tmp_path_factory):
    """One round of the same federation, plain and under secure aggregation (uniform weights: the bound is simple);
    every upload the server receives and every client's unmasked input are recorded."""
    out = tmp_path_factory.mktemp("secagg")
    uploads, inputs = [], []
    real_mask = secure_aggregation.client_mask

    def recording_mask(context, secagg, update, *args, **kwargs):
        inputs.append(np.concatenate([v.reshape(-1) for v in update.values()]))
        arrays = real_mask(context, secagg, update, *args, **kwargs)
        uploads.append(arrays)
        return arrays

    secure_aggregation.client_mask = recording_mask
    try:
        secure = run(config("federation.weighting='uniform'", *SECURE), out / "secure")
    finally:
        secure_aggregation.client_mask = real_mask
    plain = run(config("federation.weighting='uniform'"), out / "plain")
    return out, secure, plain, uploads, inputs


def test_the_unmasked_sum_is_the_plain_mean_within_the_quantisation_bound(masked_and_plain):
    out, secure, plain, _, _ = masked_and_plain
    a, b = first_round_update(out / "secure"), first_round_update(out / "plain")
    params = load_config(None, []).privacy
    quantum = 2 * params.secagg_clip_range / 2 ** params.secagg_bits
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert 0 < worst <= quantum * (1 + 1e-3) + 1e-7  # 3 clients, uniform weights: mean error <= one quantum
    assert secure["rounds"][0]["clients"] == 3 and not secure["rounds"][0]["dropped"]
    # every stage is counted: keys, shares and the unmasking come on top of the same-size uint32 upload
    assert secure["rounds"][0]["bytes_up"] > plain["rounds"][0]["bytes_up"]
    assert secure["rounds"][0]["params_up"] > plain["rounds"][0]["params_up"]  # + each group's update size


def test_uploads_are_masked_and_reveal_nothing_usable(masked_and_plain):
    _, _, _, uploads, inputs = masked_and_plain
    assert len(uploads) == 3
    for arrays, x in zip(uploads, inputs):
        assert list(arrays) == ["masked"]
        masked = arrays["masked"].numpy()
        assert masked.dtype == np.uint32
        values = masked.astype(np.float64) / 2 ** 32
        # Uniform on [0, 1): each statistic within 6 of its standard errors (the masks come from the clients' own
        # entropy, so the bounds must hold for any draw: a false failure about once in 10^8 runs).
        n = len(values)
        assert abs(values.mean() - 0.5) < 6 * 12 ** -0.5 / n ** 0.5
        assert abs(values.std() - 12 ** -0.5) < 6 * (1 / 60) ** 0.5 / n ** 0.5  # sd of a uniform's sample sd
        counts = np.bincount((values * 16).astype(int), minlength=16)
        expected = n / 16
        assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 15 degrees of freedom: p ~ 1e-7
        assert abs(np.corrcoef(values[: len(x)], x)[0, 1]) < 6 / len(x) ** 0.5
    big = np.corrcoef(uploads[0]["masked"].numpy()[:5000].astype(float), uploads[1]["masked"].numpy()[:5000])
    assert abs(big[0, 1]) < 6 / 5000 ** 0.5


def test_the_server_only_ever_receives_masked_arrays(tmp_path, server_inbox):
    seen = server_inbox
    run(config(*SECURE, "method='fedtt+'", "privacy.dp=true", "privacy.noise_multiplier=0.5"), tmp_path)
    arrays = [content["arrays"] for content in seen if "arrays" in content.array_records]
    assert len(arrays) == 3
    assert all(list(a) == ["masked"] and a["masked"].dtype == "uint32" for a in arrays)
    assert not any("wire" in content.config_records for content in seen)
    assert all(not any(k.startswith("sq:") for k in content["metrics"]) for content in seen)


def dropping_client_app(dropped):
    """The real ClientApp; partitions in ``dropped`` die in train, after the key stages (a killed client)."""
    def train(msg, context):
        if context.node_config["partition-id"] in dropped:
            raise RuntimeError("killed after sharing its keys")
        return real_client.train(msg, context)

    return client_app_with(train)


def test_a_client_killed_after_key_sharing_leaves_the_sum_over_the_survivors(tmp_path):
    runs = {}
    for name, extra in (("secure", SECURE), ("plain", [])):
        cfg = config("federation.num_clients=4", "federation.weighting='uniform'", *extra)
        run_inprocess(server_app, dropping_client_app({2}), num_nodes=4,
                      run_config=run_config_for(cfg, str(tmp_path / name)))
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["secure"]["status"] == "finished" and runs["secure"]["rounds"][0]["clients"] == 3
    assert runs["secure"]["rounds"][0]["partitions"] == runs["plain"]["rounds"][0]["partitions"] == [0, 1, 3]
    a, b = first_round_update(tmp_path / "secure"), first_round_update(tmp_path / "plain")
    quantum = 2 * 1.0 / 2 ** 22
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= quantum * 1.001 + 1e-7


def test_too_many_dropouts_keep_the_global_adapter_and_say_why(tmp_path, caplog):
    cfg = config("federation.num_clients=4", "federation.rounds=1", *SECURE)
    with caplog.at_level(logging.WARNING, logger="fedtt"):
        run_inprocess(server_app, dropping_client_app({1, 2, 3}), num_nodes=4,
                      run_config=run_config_for(cfg, str(tmp_path)))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["rounds"][0]["skipped"]
    assert "1 of 4 replies valid" in results["rounds"][0]["skipped"]
    init = fedtt.adapter_state_dict(experiment(run_config_for(cfg, "/unused")).model)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(adapter) == set(init)


def test_a_client_refuses_a_round_below_its_minimum_and_bad_parameters_are_one_line_errors():
    with pytest.raises(ValueError, match="secure aggregation needs at least 3 clients"):
        SecAggParams(num_clients=2, num_shares=2, threshold=2, clip_range=1.0)
    with pytest.raises(ValueError, match="privacy.secagg_min_clients = 3"):
        load_config(None, FAST + ["federation.num_clients=2", "privacy.secure_aggregation=true",
                                  "federation.min_replies=2"])
    assert copy.copy(secure_aggregation.round_params(load_config(None, []).privacy, 5)).threshold == 3


def test_per_group_clipping_bounds_and_noises_the_head_and_the_adapter_each_on_its_own_scale(exp, no_dropout):
    """privacy.head_grad_norm: each example's head gradient is clipped to C_head and its adapter gradient to C,
    and each group gets noise of std sigma * sqrt(2) * its own clip (the whitened mechanism is the Gaussian one of
    multiplier sigma, so the accountant's epsilon is unchanged)."""
    model, rows = exp.model, exp.partitions[0][:6]
    dp = dp_for(exp, max_grad_norm=0.001, head_grad_norm=0.1)
    params = dict(model.named_parameters())
    head = [n for n in model.fedtt_head_keys if params[n].requires_grad]
    adapter = [n for n, p in params.items() if p.requires_grad and n not in head]
    assert head and adapter
    trainable = [p for p in model.parameters() if p.requires_grad]
    inputs, targets = batch(exp.train, rows, exp.device)
    expected = []
    for i in range(len(rows)):
        model.zero_grad()
        losses("classification", model, {k: v[i:i + 1] for k, v in inputs.items()}, targets[i:i + 1]).sum().backward()
        clipped = {}
        for names, bound in ((head, 0.1), (adapter, 0.001)):
            norm = torch.sqrt(sum((params[n].grad ** 2).sum() for n in names)).item()
            assert norm > bound  # clipping acts on both groups
            clipped.update({n: params[n].grad * min(1.0, bound / (norm + 1e-6)) for n in names})
        expected.append(clipped)
    model.zero_grad()
    model.train()
    with dp.attached(model, torch.optim.AdamW(trainable, lr=1e-3)) as dp_optimizer:
        losses("classification", model, inputs, targets).mean().backward()
        dp_optimizer.clip_and_accumulate()
        for n in head + adapter:
            torch.testing.assert_close(params[n].summed_grad, sum(e[n] for e in expected), rtol=1e-4, atol=1e-7)
        dp_optimizer.noise_multiplier = 3.0
        dp_optimizer.add_noise()
        for names, bound in ((head, 0.1), (adapter, 0.001)):
            noise = torch.cat([(params[n].grad - params[n].summed_grad).reshape(-1) for n in names])
            assert noise.std().item() == pytest.approx(3.0 * 2 ** 0.5 * bound, rel=0.1)
    model.eval()
    for p in trainable:
        p.grad = None
    for e in expected:
        for names, bound in ((head, 0.1), (adapter, 0.001)):
            assert torch.sqrt(sum((e[n] ** 2).sum() for n in names)) <= bound * (1 + 1e-5)


def test_a_head_only_round_noises_the_head_for_its_own_clip_alone(exp, no_dropout):
    """With only the head training (federation.head_only_rounds) there is one group: its noise is sigma * C_head,
    not the sqrt(2) more that an adapter group with nothing to train would cost."""
    model, rows = exp.model, exp.partitions[0][:6]
    dp = dp_for(exp, max_grad_norm=0.001, head_grad_norm=0.1)
    params = dict(model.named_parameters())
    head = [n for n in model.fedtt_head_keys if params[n].requires_grad]
    adapter = [n for n, p in params.items() if p.requires_grad and n not in head]
    for n in adapter:
        params[n].requires_grad_(False)
    try:
        inputs, targets = batch(exp.train, rows, exp.device)
        model.train()
        with dp.attached(model, torch.optim.AdamW([params[n] for n in head], lr=1e-3)) as dp_optimizer:
            losses("classification", model, inputs, targets).mean().backward()
            dp_optimizer.clip_and_accumulate()
            dp_optimizer.noise_multiplier = 3.0
            dp_optimizer.add_noise()
            noise = torch.cat([(params[n].grad - params[n].summed_grad).reshape(-1) for n in head])
            assert noise.std().item() == pytest.approx(3.0 * 0.1, rel=0.1)
    finally:
        model.eval()
        for n in adapter:
            params[n].requires_grad_(True)
        for p in model.parameters():
            p.grad = None
