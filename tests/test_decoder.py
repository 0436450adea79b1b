"""Decoder LLMs: federated instruction tuning of a truncated SmolLM2 (real weights, templated TREC), generation,
label likelihood, adapters in PEFT's format, and every tensor on the configured device."""

import copy

import pytest
import torch
from peft import PeftModel

import fedtt
import fedtt.learning.batches
from fedtt.cli import main
from fedtt.config import load_config
from fedtt.federated.task import experiment, run_config_for
from fedtt.learning.batches import Encoded, batch, prompt_ids, response_ids
from fedtt.learning.evaluation import answer, generate, response_losses
from fedtt.models import load_backbone
from fedtt.run import run

TREC = ["model.name='smollm2'", "model.num_hidden_layers=2", "model.max_length=96", "task.kind='instruction'",
        "task.name='trec'", "task.max_eval_examples=16", "task.max_new_tokens=4", "task.eval_batch_size=16",
        "federation.batch_size=4", "federation.local_steps=4", "federation.rounds=2", "federation.partition='iid'",
        "federation.lr=1e-2"]


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    return run(load_config(None, TREC), out), out


def test_federated_instruction_tuning_lowers_the_held_out_response_loss(instruction_run):
    results, _ = instruction_run
    before, after = results["initial"]["validation"], results["rounds"][-1]["validation"]
    assert after["loss"] < 0.8 * before["loss"] and after["perplexity"] < before["perplexity"]
    for metrics in (before, after):
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["label_accuracy"] <= 1
    assert results["generation"] == {"decoding": "greedy", "do_sample": False, "max_new_tokens": 4}
    assert results["kind"] == "instruction" and results["selection"]["metric"] == "accuracy"


def test_generation_from_the_saved_adapter_equals_the_in_memory_model(instruction_run):
    results, out = instruction_run
    exp = experiment(run_config_for(load_config(None, TREC), str(out)))
    fedtt.load_adapter(exp.model, out / "adapter")  # the final global adapter, into the run's own model
    prompts = [exp.validation.input_ids[i][: exp.validation.response_start[i]] for i in range(6)]
    in_memory = generate(exp.model, exp.tokenizer, prompts, exp.device, 4, 8)
    saved = fedtt.load_pretrained(out / "adapter", device="cpu")  # a fresh backbone and the adapter directory
    assert generate(saved.model, saved.tokenizer, prompts, saved.device, 4, 8) == in_memory
    text = exp.task.validation[0]["prompt"]
    assert saved.generate([text], max_new_tokens=4) == generate(
        exp.model, exp.tokenizer, [fedtt.learning.batches.prompt_ids(exp.tokenizer, text)], exp.device, 4, 8)
    labels = saved.classify([exp.task.validation[0]["text"], "Who wrote Hamlet ?"])
    assert all(label in exp.task.label_names and 0 < p <= 1 for label, p in labels)


def test_the_cli_generates_and_predicts_with_a_decoder_adapter(instruction_run, capsys, tmp_path):
    _, out = instruction_run
    (tmp_path / "prompts.txt").write_text("Question: Who wrote Hamlet ?\nQuestion: How far is the moon ?\n")
    assert main(["generate", "--adapter", str(out / "adapter"), "--file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Question: Who wrote Hamlet ?\t")
    assert main(["predict", "--adapter", str(out / "adapter"), "--text", "How far is the moon ?"]) == 0
    label, probability, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM") and text == "How far is the moon ?"


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "fedtt"])
def test_a_causal_lm_adapter_round_trips_and_lora_loads_with_plain_peft(method, tmp_path):
    base, tokenizer = load_backbone("smollm2", causal_lm=True, num_hidden_layers=2)
    model = fedtt.inject(copy.deepcopy(base), fedtt.AdapterConfig(method=method, target_modules=None))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    batch = tokenizer(["The capital of France is", "Two plus two is"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    fedtt.save_adapter(model, tmp_path, metadata={"model": "smollm2", "kind": "instruction"})
    with torch.no_grad():
        again = fedtt.load_adapter(copy.deepcopy(base), tmp_path).eval()(**batch).logits
        assert torch.equal(again, expected)
        if method != "fedtt":
            peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
            assert torch.equal(peft(**batch).logits, expected)


def test_one_pass_over_each_prompt_scores_and_generates_as_full_passes_and_hf_generate_do():
    """The shared prompt cache against independent references: a full forward per (prompt, continuation), and
    transformers' own greedy ``generate``; prompts of different lengths, batches of two (left padding)."""
    base, tokenizer = load_backbone("smollm2", causal_lm=True, num_hidden_layers=4)  # 2 layers answer all alike
    model = fedtt.inject(base, fedtt.AdapterConfig(target_modules=None))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model.eval()
    prompts = [prompt_ids(tokenizer, t) for t in ("Who wrote Hamlet ?", "How far is the moon from the earth ?", "Hi")]
    responses = [response_ids(tokenizer, r) for r in ("human", "a number of miles", "location")]
    words = ["human", "entity", "number"]
    got = answer(model, tokenizer, prompts, torch.device("cpu"), 2, 5, responses, words)

    def full_nll(prompt, response):
        inputs, targets = batch(Encoded([prompt + response], [-1], [len(prompt)], tokenizer.pad_token_id), [0], "cpu")
        return response_losses(model, inputs, targets, reduce="sum").item()

    assert got.response_nll == pytest.approx([full_nll(p, r) for p, r in zip(prompts, responses)], abs=1e-4)
    expected = [[-full_nll(p, response_ids(tokenizer, w)) for w in words] for p in prompts]
    assert [s for row in got.label_scores for s in row] == pytest.approx(sum(expected, []), abs=1e-4)
    with torch.no_grad():
        reference = [tokenizer.decode(model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=5,
                                                     pad_token_id=tokenizer.pad_token_id,
                                                     eos_token_id=tokenizer.eos_token_id)[0, len(p):],
                                      skip_special_tokens=True).strip() for p in prompts]
    assert got.generated == reference and len(set(reference)) > 1


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_training_and_evaluation_tensor_is_on_the_configured_device(device):
    cfg = load_config(None, TREC + [f"model.device='{device}'", "federation.local_steps=1", "task.max_eval_examples=4"])
    exp = experiment(run_config_for(cfg, "/unused"))
    seen = []

    def check(module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor):
                seen.append(value.device.type)

    handles = [m.register_forward_pre_hook(check, with_kwargs=True) for m in exp.model.modules()]
    try:
        exp.train_local(exp.train, exp.partitions[0], seed=0, lr=1e-3)

        exp.evaluate(exp.model, exp.validation)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and set(seen) == {device}
    assert {p.device.type for p in exp.model.parameters()} == {device}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_family_models_from_a_local_directory_get_the_llama_placement(family, tmp_path):
    """Any LLaMA-family causal LM (here tiny random Mistral / Qwen2 / LLaMA saved locally, SmolLM2's tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tokenizer = load_backbone("smollm2", causal_lm=True, num_hidden_layers=1)
    config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_backbone(str(tmp_path), causal_lm=True, seed=0)
    fedtt.inject(model, fedtt.AdapterConfig())
    adapted = sorted({n.split(".adapter.")[0].rsplit(".", 1)[-1] for n in model.fedtt_trainable if ".adapter." in n})
    assert adapted == ["down_proj", "gate_proj", "up_proj"]
    lora = fedtt.inject(load_backbone(str(tmp_path), causal_lm=True, seed=0)[0], fedtt.AdapterConfig(method="lora"))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora.fedtt_trainable} == {"q_proj", "v_proj"}


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    results = {}
    for checkpointing in (False, True):
        cfg = load_config(None, TREC + [f"model.gradient_checkpointing={str(checkpointing).lower()}",
                                        "federation.local_steps=2", "task.max_eval_examples=4"])
        exp = experiment(run_config_for(cfg, "/unused"))
        loss = exp.train_local(exp.train, exp.partitions[0], seed=0, lr=1e-2)
        results[checkpointing] = (loss, fedtt.trainable_state_dict(exp.model))
    (plain, a), (checkpointed, b) = results[False], results[True]
    assert checkpointed == pytest.approx(plain, rel=1e-4)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
