"""The small-adapter baselines (VeRA, (IA)^3, Fed-SB): bytes on the wire, frozen tensors from the seed and never
sent, exact Fed-SB averaging, the backbone at init, standard PEFT directories, and short real federations."""

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import fedtt
from fedtt import AdapterConfig
from fedtt.adapters.peft_methods import SharedBasis
from fedtt.config import load_config
from fedtt.federated.codec import INDEX, PACKED, pack
from fedtt.models import load_backbone
from fedtt.run import run

METHODS = ["vera", "ia3", "fed-sb"]
HIDDEN, INTERMEDIATE, HEAD = 384, 1536, 384 * 2 + 2  # MiniLM; the head is a 2-class classifier
NPY_HEADER = 128  # np.save's header of the packed 1-D array
TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]


@pytest.fixture(scope="module")
def backbone():
    model, tokenizer = load_backbone("minilm", num_labels=2, num_hidden_layers=2, seed=0)
    return model.eval(), tokenizer


def adapted(backbone, method, **options):
    return fedtt.inject(copy.deepcopy(backbone[0]), AdapterConfig(method=method, **options))


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def expected_values(method: str, rank: int, layers: int) -> int:
    """Trainable values by each method's formula: per adapted layer, plus the head."""
    if method == "vera":
        per_layer = 2 * (rank + HIDDEN)  # query, value: d (r) and b (out)
    elif method == "ia3":
        per_layer = 3 * HIDDEN + INTERMEDIATE  # key, value, attention output dense: out; FFN output dense: in
    else:
        per_layer = 2 * rank * rank  # fed-sb; query, value: R (r x r)
    return layers * per_layer + HEAD


def perturb(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator)
            for k, v in fedtt.trainable_state_dict(model).items()}


@pytest.mark.parametrize("wire_dtype, width", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("method", METHODS)
def test_uploaded_bytes_are_the_trainable_values_times_wire_bytes_plus_the_index(backbone, method, wire_dtype, width):
    model = adapted(backbone, method, rank=16)
    update = fedtt.trainable_state_dict(model)
    values = sum(t.numel() for t in update.values())
    assert values == expected_values(method, 16, layers=2)
    arrays, index = pack(update, wire_dtype)
    assert arrays.count_bytes() == values * width + NPY_HEADER + len(PACKED)
    assert index.count_bytes() == len(INDEX) + len(index[INDEX])
    assert index.count_bytes() < 400  # names and shapes, compressed: nothing frozen travels in it either


@pytest.mark.parametrize("method", METHODS)
def test_frozen_tensors_come_from_the_seed_the_same_on_every_client_and_are_never_sent(backbone, method):
    one, two, other_seed = adapted(backbone, method), adapted(backbone, method), adapted(backbone, method, seed=1)
    state_one, state_two, state_other = one.state_dict(), two.state_dict(), other_seed.state_dict()
    assert state_one.keys() == state_two.keys()
    assert all(torch.equal(state_one[k], state_two[k]) for k in state_one)  # two clients build the same model
    sent = set(fedtt.trainable_state_dict(one))
    frozen = {k for k in state_one if any(part in k for part in (".vera_A.", ".vera_B.", ".lora_A.", ".basis."))}
    assert (len(frozen) > 0) == (method != "ia3")  # (IA)^3 has no frozen adapter tensors
    assert not frozen & sent
    assert all(not torch.equal(state_one[k], state_other[k]) for k in frozen)  # drawn from the seed
    suffix = {"vera": (".vera_lambda_b.default", ".vera_lambda_d.default"), "ia3": ".ia3_l.default",
              "fed-sb": ".R.weight"}[method]
    assert all(k.endswith(suffix) or k.startswith("classifier.") for k in sent)


def test_averaging_fed_sb_r_is_averaging_the_clients_adapters(backbone):
    model = adapted(backbone, "fed-sb", rank=8)
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_B")]
    assert layers and all(isinstance(layer.lora_B["default"], SharedBasis) for layer in layers)
    weights = [0.2, 0.3, 0.5]  # example-weighted, as the server averages
    updates, deltas = [], []
    for client in range(len(weights)):
        update = perturb(model, scale=0.5, seed=client)
        fedtt.load_trainable_state_dict(model, update)
        updates.append(update)
        deltas.append([layer.get_delta_weight("default").detach().double() for layer in layers])
    mean_r = {k: sum(w * u[k] for w, u in zip(weights, updates)) for k in updates[0]}
    fedtt.load_trainable_state_dict(model, mean_r)
    for i, layer in enumerate(layers):
        expected = sum(w * d[i] for w, d in zip(weights, deltas))
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_the_model_is_the_backbone_at_init_and_its_adapter_is_a_standard_peft_directory(backbone, method, tmp_path):
    model = adapted(backbone, method)
    assert torch.equal(logits(model, backbone[1]), logits(backbone[0], backbone[1]))
    fedtt.load_trainable_state_dict(model, perturb(model))
    trained = logits(model, backbone[1])
    assert not torch.allclose(trained, logits(backbone[0], backbone[1]))
    fedtt.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(backbone[0]), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, backbone[1]), trained, rtol=1e-5, atol=1e-6)
    reloaded = fedtt.load_adapter(copy.deepcopy(backbone[0]), tmp_path)
    torch.testing.assert_close(logits(reloaded, backbone[1]), trained, rtol=1e-5, atol=1e-6)


FAST = ["model.num_hidden_layers=1", "model.max_length=32", "task.max_eval_examples=32", "federation.num_clients=2",
        "federation.rounds=2", "federation.batch_size=8", "federation.local_steps=2", "federation.partition='iid'"]


@pytest.mark.parametrize("method", METHODS)
def test_a_short_federation_trains_each_baseline_and_sends_only_what_it_trains(method, tmp_path):
    config = load_config(None, [f"method={method}", *FAST])
    results = run(config, tmp_path / "run")
    assert results["status"] == "finished"
    values = expected_values(method, config.adapter.rank, layers=1)
    assert results["trainable_params"] == values
    for entry in results["rounds"]:
        assert entry["params_up"] == entry["params_down"] == 2 * values
        # float32 values, plus per client a message index and the round's metrics: no frozen tensor travels
        # (VeRA's shared projections alone would be 2 x 256 x 384 values)
        assert 0 < entry["bytes_up"] - 4 * entry["params_up"] < 2 * 1024
    fresh = fedtt.inject(load_backbone("minilm", num_labels=2, num_hidden_layers=1, seed=config.seed)[0],
                         config.adapter)
    fedtt.save_adapter(fresh, tmp_path / "initial")
    initial, final = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("initial", "run/adapter"))
    assert initial.keys() == final.keys()
    changed = {k for k in final if not torch.equal(initial[k], final[k])}
    frozen = {k for k in final if "vera_A" in k or "vera_B" in k or "lora_A" in k}
    assert changed - {k for k in final if ".classifier." in k}  # the adapter itself trained, not only the head
    assert not changed & frozen
    assert np.isfinite(results["rounds"][-1]["eval"]["loss"])
