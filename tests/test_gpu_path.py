"""The GPU path: what must work on CUDA, and on the CPU what can be shown there of the GPU bugs found so far.

Device tests run on the CPU and on CUDA (ids ending in ``cuda``: ``pytest -k cuda``); the CUDA ones skip without
a GPU, except under FEDTT_REQUIRE_CUDA=1 (bench/gpu_check.sh sets it), where they fail.
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fedtt
from fedtt.config import load_config
from fedtt.privacy.dp import LocalDP

REQUIRE_CUDA = os.environ.get("FEDTT_REQUIRE_CUDA") == "1"
cuda = pytest.mark.skipif(not torch.cuda.is_available() and not REQUIRE_CUDA,
                          reason="no GPU (FEDTT_REQUIRE_CUDA=1 turns this into a failure)")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
DP = ["privacy.dp=true", "privacy.noise_multiplier=1.0", "federation.batch_size=4", "federation.local_steps=2"]


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))


def test_dp_noise_generator_is_created_on_the_training_device(monkeypatch):
    """Opacus draws the noise on the parameters' device with the generator it is given: a CPU generator made
    every DP-SGD step on CUDA raise. Shown here without a GPU: the generator must be asked for on that device."""
    asked = {}

    class Recording(torch.Generator):  # a CPU generator that notes the device it was asked for
        def __new__(cls, device=None):
            generator = super().__new__(cls)
            asked[id(generator)] = torch.device(device or "cpu").type
            return generator

        def __init__(self, device=None):
            super().__init__()

    monkeypatch.setattr(torch, "Generator", Recording)
    cfg = load_config(None, DP)
    dp = LocalDP(cfg.privacy, cfg.federation, num_examples=100, rounds=1, prior=None, device=torch.device("cuda"))
    model = torch.nn.Linear(4, 2)
    with dp.attached(model, torch.optim.SGD(model.parameters(), lr=0.1)) as optimizer:
        assert asked[id(optimizer.generator)] == "cuda"


@cuda
def test_cuda_is_there_when_required():
    assert torch.cuda.is_available(), "FEDTT_REQUIRE_CUDA=1 but torch sees no CUDA device"


@pytest.mark.parametrize("device", DEVICES)
def test_dp_sgd_step_draws_its_noise_on_the_training_device(device):
    cfg = load_config(None, DP)
    device = torch.device(device)
    dp = LocalDP(cfg.privacy, cfg.federation, num_examples=100, rounds=1, prior=None, device=device)
    model = torch.nn.Linear(4, 2).to(device)
    before = model.weight.detach().clone()
    with dp.attached(model, torch.optim.SGD(model.parameters(), lr=0.1)) as optimizer:
        torch.nn.functional.cross_entropy(model(torch.randn(4, 4, device=device)),
                                          torch.tensor([0, 1, 0, 1], device=device)).backward()
        optimizer.step()
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fedtt", "lora", "ffa-lora"])
def test_bfloat16_adapters_train_and_match_float32(method, device):
    """Every method on a bf16 backbone: adapter math in fp32, finite gradients on the device, and the same logits
    as the fp32 model to bf16's precision."""
    device = torch.device(device)
    models = {dtype: fedtt.inject(tiny_llama().to(dtype), fedtt.AdapterConfig(method=method)).to(device)
              for dtype in (torch.float32, torch.bfloat16)}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    logits = {dtype: model(input_ids=ids).logits for dtype, model in models.items()}
    torch.testing.assert_close(logits[torch.bfloat16].float(), logits[torch.float32], rtol=0.05, atol=0.05)
    torch.nn.functional.cross_entropy(logits[torch.bfloat16].flatten(0, 1).float(), ids.flatten()).backward()
    trainable = [p for p in models[torch.bfloat16].parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.device.type == device.type and torch.isfinite(p.grad).all()
                             for p in trainable)
