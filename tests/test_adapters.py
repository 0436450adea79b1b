import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import fedtt
from fedtt import AdapterConfig
from fedtt.models import load_backbone

TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def meta_model(cls, config):
    with torch.device("meta"):
        return cls(config)


ROBERTA_BASE = RobertaConfig(num_labels=2)
LLAMA_2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=32000)
LLAMA_2_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                          num_attention_heads=40, vocab_size=32000)


@pytest.mark.parametrize("cls, geometry, rank, norms, expected", [
    (RobertaForSequenceClassification, ROBERTA_BASE, 5, False, 57_408),
    (RobertaForSequenceClassification, ROBERTA_BASE, 5, True, 95_808),
    (LlamaForSequenceClassification, LLAMA_2_7B, 5, False, 610_560),
    (LlamaForSequenceClassification, LLAMA_2_7B, 5, True, 876_800),
    (LlamaForSequenceClassification, LLAMA_2_13B, 8, False, 1_261_440),
])
def test_parameter_counts_equal_loretta_published_ones(cls, geometry, rank, norms, expected):
    model = fedtt.inject(meta_model(cls, geometry), AdapterConfig(rank=rank, train_norms=norms, train_head=False,
                                                                 train_biases=True))
    assert count(model) == expected


def test_lora_counts_on_paper_geometries():
    lora = fedtt.inject(meta_model(LlamaForSequenceClassification, LLAMA_2_7B),
                        AdapterConfig(method="lora", train_head=False))
    ffa = fedtt.inject(meta_model(RobertaForSequenceClassification, ROBERTA_BASE),
                       AdapterConfig(method="ffa-lora", train_head=False))
    assert count(lora) == 4_194_304 and count(ffa) == 147_456


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model, tokenizer = load_backbone("minilm", num_labels=2, num_hidden_layers=2)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def smollm():
    torch.manual_seed(0)
    model, tokenizer = load_backbone("smollm2", num_labels=2, num_hidden_layers=2)
    return model.eval(), tokenizer


def logits(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("backbone", ["minilm", "smollm"])
def test_at_round_0_every_method_is_the_backbone_with_the_same_head(backbone, request):
    """The default (identity) init: TT adapters start at zero like LoRA's B, so logits equal the backbone's."""
    base, tokenizer = request.getfixturevalue(backbone)
    for method in ("fedtt", "lora", "ffa-lora"):
        model = fedtt.inject(copy.deepcopy(base), AdapterConfig(method=method))
        assert torch.equal(logits(model, tokenizer), logits(base, tokenizer)), method
    tensorized = fedtt.inject(copy.deepcopy(base), AdapterConfig(head="tensorized")) if backbone == "minilm" else base
    assert torch.equal(logits(tensorized, tokenizer), logits(base, tokenizer))
    adapted = fedtt.inject(copy.deepcopy(base), AdapterConfig(init="loretta"))  # LoRETTA's: not the backbone
    assert not torch.allclose(logits(adapted, tokenizer), logits(base, tokenizer))


@pytest.mark.parametrize("backbone, adapters_per_layer", [("minilm", 2), ("smollm", 3)])
def test_placement_trainable_set_and_backward(backbone, adapters_per_layer, request):
    base, tokenizer = request.getfixturevalue(backbone)
    model = fedtt.inject(copy.deepcopy(base), AdapterConfig())
    adapters = [n for n, m in model.named_modules() if isinstance(m, fedtt.adapters.TensorizedAdapter)]
    assert len(adapters) == adapters_per_layer * model.config.num_hidden_layers
    for name, param in model.named_parameters():
        is_core = ".adapter." in name and not name.endswith(".bias")  # adapter biases and norms: off by default
        is_ours = is_core or name.startswith(("classifier", "score"))
        assert param.requires_grad == is_ours, name
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model = fedtt.inject(copy.deepcopy(base), AdapterConfig(init="loretta", train_norms=True))
    assert any("norm" in n.lower() for n in model.fedtt_trainable)
    model.train()
    torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() > 0 for g in grads.values()) == len(grads)


def test_ffa_lora_freezes_a_and_trains_b(minilm):
    base, tokenizer = minilm
    model = fedtt.inject(copy.deepcopy(base), AdapterConfig(method="ffa-lora"))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert a_before and not any(n in model.fedtt_trainable for n in a_before)
    assert any("lora_B" in n for n in model.fedtt_trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], a) for n, a in a_before.items())
    assert set(a_before) <= set(fedtt.adapter_state_dict(model))  # A is saved with the adapter
    lora = fedtt.inject(copy.deepcopy(base), AdapterConfig(method="lora"))
    assert count(lora) == 2 * (count(model) - 2 * 384 - 2) + 2 * 384 + 2  # LoRA trains A and B: twice B


@pytest.mark.parametrize("method", ["fedtt", "lora", "ffa-lora"])
@pytest.mark.parametrize("backbone", ["minilm", "smollm"])
def test_save_load_round_trip_on_a_fresh_backbone(method, backbone, request, tmp_path):
    base, tokenizer = request.getfixturevalue(backbone)
    model = fedtt.inject(copy.deepcopy(base), AdapterConfig(method=method, seed=1))
    with torch.no_grad():  # move every trainable tensor away from its init, so loading has to do real work
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    fedtt.save_adapter(model, tmp_path, metadata={"model": backbone})
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "fedtt.json"}
    fresh = fedtt.load_adapter(copy.deepcopy(base), tmp_path)
    assert fresh.fedtt_config == model.fedtt_config
    assert torch.equal(logits(fresh, tokenizer), logits(model, tokenizer))
    if method != "fedtt":  # a standard PEFT adapter: plain peft loads it, head included, without fedtt
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        assert torch.equal(logits(peft_model, tokenizer), logits(model, tokenizer))


def test_a_frozen_head_is_saved_with_the_adapter(minilm, tmp_path):
    base, tokenizer = minilm
    model = fedtt.inject(copy.deepcopy(base), AdapterConfig(train_head=False))
    assert "classifier.weight" not in model.fedtt_trainable
    fedtt.save_adapter(model, tmp_path)
    torch.manual_seed(99)  # another head init: loading must restore the run's
    other, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=2)
    assert torch.equal(logits(fedtt.load_adapter(other.eval(), tmp_path), tokenizer), logits(model, tokenizer))


def test_tensorized_head_and_lora_on_every_linear(minilm):
    base, _ = minilm
    model = fedtt.inject(copy.deepcopy(base), AdapterConfig(head="tensorized"))
    tt = [n for n in model.fedtt_trainable if n.startswith("bert.pooler.dense.tt.")]
    assert tt and "bert.pooler.dense.base_layer.weight" not in model.fedtt_trainable
    assert sum(dict(model.named_parameters())[n].numel() for n in tt) < 384 * 384 / 20
    with pytest.raises(ValueError, match="goes with the TT methods"):
        AdapterConfig(method="lora", head="tensorized")
    everywhere = fedtt.inject(copy.deepcopy(base), AdapterConfig(method="lora", target_modules=["all-linear"]))
    wrapped = {n.split(".lora_A")[0] for n in everywhere.fedtt_trainable if "lora_A" in n}
    assert len(wrapped) == 2 * 6 + 1 and not any(n.startswith("classifier") for n in wrapped)  # 6 per layer + pooler


def test_adapters_train_in_float32_on_a_half_precision_backbone():
    model, tokenizer = load_backbone("minilm", num_labels=2, num_hidden_layers=1, dtype=torch.bfloat16, seed=0)
    for method in ("fedtt", "lora"):
        adapted = fedtt.inject(copy.deepcopy(model), AdapterConfig(method=method))
        dtypes = {n: p.dtype for n, p in adapted.named_parameters() if ".lora_" in n or ".adapter." in n}
        assert dtypes and set(dtypes.values()) == {torch.float32}, method
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        out = adapted(**batch).logits
        torch.nn.functional.cross_entropy(out.float(), torch.tensor([1, 0])).backward()
        assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


def test_trainable_state_dict_names_are_stable_and_loading_is_strict(minilm):
    base, _ = minilm
    a = fedtt.inject(copy.deepcopy(base), AdapterConfig())
    b = fedtt.inject(copy.deepcopy(base), AdapterConfig(seed=7))
    state = fedtt.trainable_state_dict(a)
    assert list(state) == list(fedtt.trainable_state_dict(b))
    assert "bert.encoder.layer.0.attention.output.dense.adapter.down.core_0" in state
    fedtt.load_trainable_state_dict(b, state)
    assert all(torch.equal(v, fedtt.trainable_state_dict(b)[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="1 missing"):
        fedtt.load_trainable_state_dict(b, dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="1 unknown"):
        fedtt.load_trainable_state_dict(b, {**state, "bert.pooler.dense.weight": torch.zeros(384, 384)})
    name = next(iter(state))
    with pytest.raises(ValueError, match=f"{name}.*has shape"):
        fedtt.load_trainable_state_dict(b, {**state, name: torch.zeros(3)})


def test_unknown_architecture_and_bad_config_errors(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

    with pytest.raises(ValueError, match="supported families: bert: .*adapter.target_modules"):
        fedtt.inject(Tiny(), AdapterConfig())
    model = fedtt.inject(Tiny(), AdapterConfig(target_modules=["proj"], bottleneck=8, rank=2))
    assert isinstance(model.proj, fedtt.adapters.AdaptedLinear)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        fedtt.inject(Tiny(), AdapterConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="method"):
        AdapterConfig(method="dora")
    with pytest.raises(FileNotFoundError, match="fedtt.json not found"):
        fedtt.load_adapter(Tiny(), tmp_path)
