"""Training-step time, peak memory and trainable parameters: TT adapter (FedTT) vs LoRA vs FFA-LoRA.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/adapter_step.py [--model minilm|smollm2] [--layers N] [--steps 12]
    ... bench/adapter_step.py --model llama2-7b-random --device cuda --dtype bfloat16 [--json out.json]

Timing: one process loads the bundled backbone (real weights) once, deep-copies it per method (same seeded
head), injects each method's default adapter and times a full local step (forward + backward + AdamW) on
the same real batch, built and scored by fedtt's own training code (MiniLM: Rotten Tomatoes classification;
SmolLM2: templated TREC instructions, loss on the response). The methods run round-robin (TT, LoRA, FFA-LoRA,
TT, ...) after warm-up, so machine noise hits all three alike; medians and IQRs are reported. ``smollm2-random``
and ``llama2-7b-random`` are randomly initialised LLaMA models of SmolLM2-135M's and LLaMA-2-7B's geometry (step
time and memory do not depend on the weights' values), fed the same TREC batch in SmolLM2's tokens (ids taken
modulo LLaMA-2's 32,000-token vocabulary).
Memory: for each method a child process loads the backbone alone and runs the same steps while a thread samples
its resident memory; it reports the peak during training above the resident memory just before (the training
working set: activations, gradients, optimizer state), so neither loading nor the other methods mix in. The
children run one after another. On CUDA, memory is measured in-process from the allocator: the peak during one
step above what was allocated before it, plus the optimizer's state (the same working set, exactly counted).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

import fedtt
from fedtt import AdapterConfig
from fedtt.data import load_task
from fedtt.learning.batches import batch, encode_classification, encode_instruction
from fedtt.learning.evaluation import losses
from fedtt.models import load_backbone

METHODS = [("TT adapter (fedtt)", "fedtt"), ("LoRA", "lora"), ("FFA-LoRA", "ffa-lora")]
# Randomly initialised LLaMA geometries (hidden, FFN, heads, KV heads, layers, vocabulary).
GEOMETRIES = {
    "smollm2-random": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                           num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True),
    "llama2-7b-random": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                             num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("minilm", "smollm2", *GEOMETRIES), default="minilm")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the backbone's dtype")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--steps", type=int, default=12, help="timed steps per method (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first (default 3)")
    p.add_argument("--batch-size", type=int, default=0, help="examples per step (default: 32 MiniLM, 8 SmolLM2)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--layers", type=int, default=0, help="pretrained layers to keep; 0 = all (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", metavar="METHOD", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (32 if args.model == "minilm" else 8)
    args.device, args.dtype = torch.device(args.device), getattr(torch, args.dtype)
    return args


def command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    env = f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} " if "HF_HUB_OFFLINE" in os.environ else ""
    return env + shlex.join(argv)


def random_llama(name: str, layers: int, device: torch.device, dtype: torch.dtype, seed: int):
    geometry = {**GEOMETRIES[name], **({"num_hidden_layers": layers} if layers else {})}
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: a 7B model is never materialised in fp32 or on the CPU
        return AutoModelForCausalLM.from_config(LlamaConfig(**geometry, rms_norm_eps=1e-5), dtype=dtype)


def setup(args):
    """The backbone, one real batch in fedtt's format, the task kind and a description of the batch."""
    decoder = args.model != "minilm"
    if args.model in GEOMETRIES:
        _, tokenizer = load_backbone("smollm2", causal_lm=True, num_hidden_layers=1)
        backbone = random_llama(args.model, args.layers, args.device, args.dtype, args.seed)
    else:
        backbone, tokenizer = load_backbone(args.model, num_labels=2, num_hidden_layers=args.layers,
                                            causal_lm=decoder, seed=args.seed, dtype=args.dtype)
        backbone.to(args.device)
    if decoder:
        train = load_task("trec", kind="instruction").train.select(range(args.batch_size))
        data = encode_instruction(train["prompt"], train["response"], train["label"], tokenizer, args.max_length)
        what = f"templated TREC instructions train[:{args.batch_size}], loss on the response"
    else:
        train = load_task("rotten_tomatoes").train.select(range(args.batch_size))
        data = encode_classification(train["text"], train["label"], tokenizer, args.max_length)
        what = f"rotten_tomatoes train[:{args.batch_size}]"
    inputs, targets = batch(data, range(args.batch_size), args.device)
    vocab = backbone.config.vocab_size
    inputs["input_ids"] %= vocab
    if decoder:
        targets = torch.where(targets >= 0, targets % vocab, targets)
    tokens = int(inputs["attention_mask"].sum())
    return (backbone, (inputs, targets), "instruction" if decoder else "classification", f"{what}, {tokens} tokens",
            tokens)


def build(backbone, method: str, seed: int):
    model = copy.deepcopy(backbone)
    before = {id(p) for p in model.parameters()}
    fedtt.inject(model, AdapterConfig(method=method, seed=seed))
    model.train()  # dropout on, as in local training
    params = [p for p in model.parameters() if p.requires_grad]
    counts = {"tensors": len(params), "trainable": sum(p.numel() for p in params),
              "adapter": sum(p.numel() for p in params if id(p) not in before)}
    return model, torch.optim.AdamW(params, lr=1e-4), params, counts


def train_step(model, optimizer, kind: str, data) -> tuple[float, float]:
    """Wall and process-CPU seconds of one forward + backward + AdamW step. CPU / wall is the cores it got."""
    optimizer.zero_grad(set_to_none=True)
    cuda = data[1].device.type == "cuda"
    if cuda:  # CUDA runs asynchronously: time the work, not its launch
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    losses(kind, model, *data).mean().backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def cuda_step_memory(model, optimizer, kind: str, data) -> float:
    """Training working set (MB) on CUDA: one step's peak above what was allocated before it (activations,
    gradients, temporaries) plus the optimizer's state, which lives across steps."""
    optimizer.zero_grad(set_to_none=True)  # the last step's gradients are part of this step's working set
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, kind, data)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.device.type == "cuda")
    return (torch.cuda.max_memory_allocated() - before + state) / 2**20


def peak_memory(args, method: str) -> float:
    """Training working set (MB) of a child process that loads the backbone and runs the steps with ``method``."""
    argv = [sys.executable, __file__, "--memory-child", method, "--model", args.model, "--layers", str(args.layers),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--dtype", str(args.dtype).removeprefix("torch.")]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backbone, data, kind, described, tokens = setup(args)
    if args.memory_child:
        model, optimizer, _, _ = build(backbone, args.memory_child, args.seed)
        del backbone
        gc.collect()
        process, peak, done = psutil.Process(), [0], threading.Event()
        before = process.memory_info().rss

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for _ in range(args.warmup + args.steps):
            train_step(model, optimizer, kind, data)
        done.set()
        sampler.join()
        print(json.dumps({"peak_rss_mb": (max(peak[0], process.memory_info().rss) - before) / 2**20}))
        return
    layers = backbone.config.num_hidden_layers
    runs = []
    for label, method in METHODS:
        model, optimizer, params, counts = build(backbone, method, args.seed)
        runs.append({"label": label, "method": method, "model": model, "opt": optimizer, "params": params,
                     "counts": counts, "times": [], "cores": []})
    del backbone
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    load_before = os.getloadavg()[0]
    for step in range(args.warmup + args.steps):  # round-robin: slow phases of the machine are shared
        for run in runs:
            seconds, cpu_seconds = train_step(run["model"], run["opt"], kind, data)
            if step == 0 and any(p.grad is None for p in run["params"]):
                raise RuntimeError(f"{run['label']}: a trainable tensor got no gradient")
            if step >= args.warmup:
                run["times"].append(seconds)
                run["cores"].append(cpu_seconds / seconds)
    load_after = os.getloadavg()[0]
    for run in runs:
        if cuda:
            run["peak"] = cuda_step_memory(run["model"], run["opt"], kind, data)
        run["model"] = run["opt"] = None
        run["q"] = quartiles([t * 1e3 for t in run["times"]])
        run["tokens_per_s"] = tokens / (run["q"][1] / 1e3)
        if not cuda:
            run["peak"] = peak_memory(args, run["method"])
    device = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} CPUs"
    tt, lora, ffa = runs
    out = ["Command:", "", "```", command_line(), "```", "",
           f"Settings: {args.model} ({layers} layers, {str(args.dtype).removeprefix('torch.')} on {device}), batch "
           f"{args.batch_size} x <= {args.max_length} tokens ({described}), {args.warmup} warm-up + {args.steps} "
           f"timed steps per method, round-robin; AdamW; seed {args.seed}; torch {torch.__version__} "
           f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python "
           f"{platform.python_version()}, {os.cpu_count()} CPUs; 1-min load average {load_before:.2f} before / "
           f"{load_after:.2f} after the timed loop.", "",
           "| method | trainable params | of which adapter | trainable tensors | step median (ms) | IQR (ms) "
           "[Q1-Q3] | CPU / wall | training memory (MB) | training tokens / s |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for run in runs:
        c, (q1, q2, q3) = run["counts"], run["q"]
        out.append(f"| {run['label']} | {c['trainable']:,} | {c['adapter']:,} | {c['tensors']} | {q2:.1f} | "
                   f"{q3 - q1:.1f} [{q1:.1f}-{q3:.1f}] | {statistics.median(run['cores']):.2f} | {run['peak']:.0f} | "
                   f"{run['tokens_per_s']:,.0f} |")
    out += ["", "| ratio | value |", "|---|--:|",
            f"| step time TT / LoRA (medians) | {tt['q'][1] / lora['q'][1]:.2f} |",
            f"| step time TT / FFA-LoRA (medians) | {tt['q'][1] / ffa['q'][1]:.2f} |",
            f"| training memory TT / LoRA | {tt['peak'] / lora['peak']:.2f} |",
            f"| trainable params LoRA / TT | {lora['counts']['trainable'] / tt['counts']['trainable']:.2f} |",
            f"| trainable params FFA-LoRA / TT | {ffa['counts']['trainable'] / tt['counts']['trainable']:.2f} |",
            "", "Each method at its defaults (fedtt.defaults): TT rank 5 (cores only), LoRA / FFA-LoRA r = 8 on the "
            "family's attention projections; norms frozen for all; the task head (MiniLM) trained by all. CPU / wall "
            "well below the thread count means other processes competed for the cores."]
    print("\n".join(out))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "model": args.model, "layers": layers, "device": device, "dtype": str(args.dtype).removeprefix("torch."),
            "batch": args.batch_size, "tokens": tokens, "torch": torch.__version__, "markdown": "\n".join(out),
            "methods": {r["method"]: {"trainable": r["counts"]["trainable"], "step_ms": r["q"][1],
                                      "step_ms_iqr": r["q"][2] - r["q"][0], "memory_mb": r["peak"],
                                      "tokens_per_s": r["tokens_per_s"]} for r in runs},
        }, indent=1))


if __name__ == "__main__":
    main()
