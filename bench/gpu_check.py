"""fedtt's GPU check (issue 31): the suite's CUDA tests, federated runs on the GPU against the CPU in float32, and
bench/adapter_step.py on the GPU. Run it through bench/gpu_check.sh, which sets up packages and model files.

    bench/gpu_check.sh [--dry-run] [--out DIR]

Steps, each recorded (pass / fail, what and how long) in DIR/gpu_check.json and DIR/gpu_check.md (DIR: --out, else
$OUT, else runs/gpu-check), the logs and every run's results.json in DIR/logs.tar.gz; exits 1 when a check failed:

1. tests: ``pytest -k cuda`` over the test files that mention CUDA, with FEDTT_REQUIRE_CUDA=1 so that a CUDA test
   fails rather than skips without a GPU; any skip fails the step.
2. federated: ``fedtt run`` (the public CLI) of fedtt, fedtt+, lora and ffa-lora on SmolLM2 (its first two
   layers, real weights) instruction-tuned on templated TREC, 3 clients, 2 rounds, in bfloat16 and float32 on the
   GPU, and the same with DP-SGD and with SecAgg+ (fedtt and lora, bfloat16); each against the same config in
   float32 on the CPU of the same machine (run alongside, CUDA hidden). Compared: the held-out (validation)
   loss before training and after the last round, relative difference within TOLERANCE; with DP also each
   client's epsilon (the same accountant, so equal).
3. bench: adapter_step.py in bfloat16 on the GPU, on randomly initialised models of SmolLM2-135M's geometry and
   of LLaMA-2-7B's (all 32 layers where four copies fit in the GPU's free memory, else as many as do).

``--dry-run``: the same steps on the CPU at tiny sizes, with bfloat16 on the CPU standing in for the GPU (CUDA
tests skip); it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = ("fedtt", "fedtt+", "lora", "ffa-lora")
TASK = ["model.name='smollm2'", "model.num_hidden_layers=2", "model.max_length=64", "task.name='trec'",
        "task.kind='instruction'", "task.max_new_tokens=2", "federation.num_clients=3", "federation.rounds=2",
        "federation.partition='iid'", "federation.lr_schedule='constant'", "seed=0"]
SIZES = {False: ["task.max_eval_examples=48", "task.eval_batch_size=48", "federation.local_steps=5",
                 "federation.batch_size=8"],
         True: ["task.max_eval_examples=4", "task.eval_batch_size=4", "federation.local_steps=2",
                "federation.batch_size=2"]}
# setting -> (overrides, methods; the dry run takes the first method only for DP and SecAgg)
SETTINGS = {"plain": ([], METHODS),
            "dp": (["privacy.dp=true", "privacy.target_epsilon=8.0"], ("fedtt", "lora")),
            "secagg": (["privacy.secure_aggregation=true", "federation.min_replies=3"], ("fedtt", "lora"))}
# Largest relative difference of a held-out loss from the CPU float32 run's. float32: summation order only.
# bfloat16 (8 significant bits): bf16 on the CPU (dry run) differs by at most 3e-3 before and after training, which
# lowers the loss by 3-21% (FedTT+, one factor group a round: 0.7%), so 0.02 passes rounding and fails a broken
# update. DP: clients draw their noise from their own entropy (and the GPU with Philox, not MT19937), so runs agree
# only up to the noise's effect.
TOLERANCE = {"float32": 0.01, "bfloat16": 0.02, "dp": 0.05}
LLAMA2_7B = {"hidden": 4096, "ffn": 11008, "vocab": 32000, "layers": 32}


def sh(argv: list[str], log: pathlib.Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``argv`` in the repository root with output to ``log``; (exit status, seconds); 124 on timeout."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, round(time.perf_counter() - start, 1)


def tail(log: pathlib.Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def environment(dry: bool) -> dict:
    import torch

    def version(name: str) -> str:  # a missing package is reported, not fatal: the steps' logs say what broke
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "MISSING"

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), **{name: version(name) for name in
                                      ("transformers", "peft", "flwr", "opacus", "pydantic", "tokenizers")}}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        env |= {"device": torch.cuda.get_device_name(), "memory_gib": round(total / 2**30, 1),
                "free_gib": round(free / 2**30, 1)}
    elif not dry:
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores; dry run)"
    return env


def tests(work: pathlib.Path, dry: bool) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "cuda" in p.read_text())
    xml, log = work / "tests.xml", work / "tests.log"
    rc, seconds = sh([sys.executable, "-m", "pytest", *files, "-k", "cuda", "-q", "-p", "no:cacheprovider",
                      f"--junitxml={xml}"], log, 300, env={} if dry else {"FEDTT_REQUIRE_CUDA": "1"})
    cases = []
    if xml.is_file():
        for case in ET.parse(xml).iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
    ok = rc == 0 and bool(cases) and (dry or counts["skipped"] == 0)
    return {"ok": ok, "files": files, "rc": rc, "seconds": seconds, **counts, "cases": cases,
            **({} if ok else {"log_tail": tail(log)})}


def federated(work: pathlib.Path, dry: bool) -> dict:
    """Every (setting, run, method) as one ``fedtt run`` process; CPU ones alongside the GPU ones."""
    device = "cpu" if dry else "cuda"
    jobs = []
    for setting, (overrides, methods) in SETTINGS.items():
        variants = [("reference", "cpu", "float32"), ("bfloat16", device, "bfloat16")]  # named by their dtype
        if setting == "plain" and not dry:
            variants.append(("float32", device, "float32"))
        jobs += [{"setting": setting, "variant": name, "device": dev, "dtype": dtype, "method": method,
                  "overrides": overrides} for name, dev, dtype in variants
                 for method in (methods[:1] if dry and setting != "plain" else methods)]

    def launch(job: dict) -> dict:
        name = f"{job['setting']}-{job['variant']}-{job['method'].replace('+', 'plus')}"
        out, log = work / "federated" / name, work / f"federated-{name}.log"
        sets = [*TASK, *SIZES[dry], *job["overrides"], f"method='{job['method']}'", f"model.device='{job['device']}'",
                f"model.dtype='{job['dtype']}'"]
        argv = [sys.executable, "-c", "import sys; from fedtt.cli import main; sys.exit(main())", "run",
                "--out", str(out), "--overwrite", *[a for s in sets for a in ("--set", s)]]
        # CPU runs share the machine's cores and never touch the GPU (no CUDA context, no contention).
        env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 4) // 4))} \
            if job["device"] == "cpu" and not dry else {}
        rc, seconds = sh(argv, log, 1800 if dry else 300, env)
        path = out / "results.json"
        return {**job, "rc": rc, "seconds": seconds, "log": log,
                "results": json.loads(path.read_text()) if rc == 0 and path.is_file() else None}

    if dry:  # one torch job at a time on a small machine
        done = [launch(job) for job in jobs]
    else:  # three CPU runs (a quarter of the cores each) and two GPU runs at a time
        with concurrent.futures.ThreadPoolExecutor(3) as cpu, concurrent.futures.ThreadPoolExecutor(2) as gpu:
            done = [f.result() for f in [(cpu if job["device"] == "cpu" else gpu).submit(launch, job)
                                         for job in jobs]]
    references = {(j["setting"], j["method"]): j["results"] for j in done if j["variant"] == "reference"}
    rows = []
    failures = [f"{j['setting']} {j['variant']} {j['method']}: exit {j['rc']}: {tail(j['log'], 8)}"
                for j in done if j["rc"]]
    for job in done:
        if job["variant"] == "reference":
            continue
        setting, method, got = job["setting"], job["method"], job["results"]
        ref = references[(setting, method)]
        row = {"setting": setting, "variant": job["variant"], "method": method,
               "tolerance": TOLERANCE["dp" if setting == "dp" else job["variant"]]}
        if got is None or ref is None:
            rows.append({**row, "ok": False, "error": "no results"})
            continue
        row |= {"seconds": got["wall_seconds"], "reference_seconds": ref["wall_seconds"]}
        for when, loss in (("initial", lambda r: r["initial"]["validation"]["loss"]),
                           ("final", lambda r: r["rounds"][-1]["validation"]["loss"])):
            row[when] = {"loss": loss(got), "reference": loss(ref),
                         "rel_diff": abs(loss(got) - loss(ref)) / abs(loss(ref))}
        row["ok"] = all(math.isfinite(row[w]["loss"]) and row[w]["rel_diff"] <= row["tolerance"]
                        for w in ("initial", "final"))
        if setting == "dp":
            eps, ref_eps = got["privacy"]["epsilon"], ref["privacy"]["epsilon"]
            row["epsilon_max"] = max(eps.values())
            row["ok"] &= eps.keys() == ref_eps.keys() and all(math.isclose(eps[k], ref_eps[k], rel_tol=1e-6)
                                                               for k in eps)
        rows.append(row)
    return {"ok": not failures and all(r["ok"] for r in rows), "rows": rows, "failures": failures,
            "processes": [{k: j[k] for k in ("setting", "variant", "method", "rc", "seconds")} for j in done]}


def llama2_layers() -> int:
    """All 32 layers of LLaMA-2-7B in bf16 if four copies (the backbone and one per method) fit in 85% of the
    GPU's free memory, else as many as do."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    h, f, v = LLAMA2_7B["hidden"], LLAMA2_7B["ffn"], LLAMA2_7B["vocab"]
    layer, ends = 2 * (4 * h * h + 3 * h * f + 2 * h), 2 * (2 * v * h + h)
    return max(1, min(LLAMA2_7B["layers"], int((0.85 * free / 4 - ends) // layer)))


def bench(work: pathlib.Path, dry: bool) -> dict:
    if dry:
        small = ["--device", "cpu", "--dtype", "float32", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                 "--max-length", "32"]
        runs = {"smollm2-random": ["--layers", "2", *small], "llama2-7b-random": ["--layers", "1", *small]}
    else:
        gpu = ["--device", "cuda", "--dtype", "bfloat16", "--steps", "20", "--warmup", "5"]
        runs = {"smollm2-random": gpu, "llama2-7b-random": ["--layers", str(llama2_layers()), *gpu]}
    results, failures = {}, []
    for model, extra in runs.items():
        path, log = work / f"bench-{model}.json", work / f"bench-{model}.log"
        rc, seconds = sh([sys.executable, "bench/adapter_step.py", "--model", model, *extra, "--json", str(path)],
                         log, 300)
        if rc == 0 and path.is_file():
            results[model] = {**json.loads(path.read_text()), "seconds": seconds}
        else:
            failures.append(f"{model}: exit {rc}: {tail(log, 8)}")
    return {"ok": not failures, "results": results, "failures": failures}


def markdown(summary: dict) -> str:
    env, dry = summary["environment"], summary["dry_run"]
    title = "CPU dry run (not GPU numbers)" if dry else env["device"]
    lines = [f"# fedtt GPU check: {title}: {'PASS' if summary['ok'] else 'FAIL'}", "",
             f"`{summary['command']}`, {summary['date']}, {summary['seconds']:.0f} s. " + ", ".join(
                 f"{k} {v}" for k, v in env.items() if k != "device"), "", f"Model files: {summary['model_files']}",
             ""]
    t = summary["tests"]
    lines += [f"## CUDA tests: {'pass' if t['ok'] else 'FAIL'}", "",
              f"`pytest {' '.join(t['files'])} -k cuda`: {t['passed']} passed, {t['failure']} failed, "
              f"{t['error']} errors, {t['skipped']} skipped ({t['seconds']} s)"
              + (" (dry run: no CUDA, skips expected)" if dry else ""), ""]
    lines += [f"  - {c['outcome']}: {c['test']}" for c in t["cases"]] + [""]
    if "log_tail" in t:
        lines += ["```", t["log_tail"], "```", ""]
    f = summary["federated"]
    lines += [f"## Federated runs against CPU float32: {'pass' if f['ok'] else 'FAIL'}", "",
              "Held-out (validation) loss, SmolLM2 first 2 layers, templated TREC, 3 clients, 2 rounds; relative "
              "difference from the same config in float32 on the CPU.", "",
              "| setting | method | run | loss before (run / CPU fp32) | rel. diff | loss after (run / CPU fp32) "
              "| rel. diff | tolerance | ok | wall s (run / CPU) |", "|---|---|---|--:|--:|--:|--:|--:|---|--:|"]
    for r in f["rows"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['method']} | {r['variant']} | {r['error']} | | | | | FAIL | |")
            continue
        i, z = r["initial"], r["final"]
        eps = f" (epsilon {r['epsilon_max']:.2f})" if "epsilon_max" in r else ""
        lines.append(f"| {r['setting']}{eps} | {r['method']} | {r['variant']} | {i['loss']:.4f} / "
                     f"{i['reference']:.4f} | {i['rel_diff']:.2e} | {z['loss']:.4f} / {z['reference']:.4f} | "
                     f"{z['rel_diff']:.2e} | {r['tolerance']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r['seconds']:.0f} / {r['reference_seconds']:.0f} |")
    lines += [""] + [f"- failed: {x}" for x in f["failures"]] + [""]
    b = summary["bench"]
    lines += [f"## Adapter training step (bench/adapter_step.py): {'pass' if b['ok'] else 'FAIL'}", "",
              "| model | layers | dtype | step ms TT / LoRA / FFA-LoRA | TT / LoRA | TT / FFA-LoRA | memory MB TT / "
              "LoRA / FFA-LoRA | TT / LoRA | tokens/s TT / LoRA / FFA-LoRA |", "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for model, r in b["results"].items():
        m = [r["methods"][k] for k in ("fedtt", "lora", "ffa-lora")]
        each = {key: " / ".join(format(x[key], spec) for x in m)
                for key, spec in (("step_ms", ".1f"), ("memory_mb", ".0f"), ("tokens_per_s", ",.0f"))}
        lines.append(f"| {model} | {r['layers']} | {r['dtype']} | {each['step_ms']} | "
                     f"{m[0]['step_ms'] / m[1]['step_ms']:.2f} | {m[0]['step_ms'] / m[2]['step_ms']:.2f} | "
                     f"{each['memory_mb']} | {m[0]['memory_mb'] / m[1]['memory_mb']:.2f} | {each['tokens_per_s']} |")
    lines += [""] + [f"- failed: {x}" for x in b["failures"]]
    for model, r in b["results"].items():
        lines += ["", f"### {model}", "", r["markdown"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    args = parser.parse_args()
    out, start = pathlib.Path(args.out).resolve(), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dry_run": args.dry_run, "command": "bench/gpu_check.sh" + " --dry-run" * args.dry_run,
               "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "environment": environment(args.dry_run),
               "model_files": "SmolLM2-135M-Instruct's GGUF cut to its first 2 layers (real weights, Q4_1; the token "
                              "embedding re-quantised from Q8_0 to Q4_1 to fit the carry limit: .gpu-assets/site); "
                              "adapter_step's models randomly initialised at SmolLM2-135M's and LLaMA-2-7B's geometry "
                              "with SmolLM2's tokenizer"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = pathlib.Path(tmp)
        for step in (tests, federated, bench):
            print(f"[gpu_check] {step.__name__} ...", flush=True)
            summary[step.__name__] = step(work, args.dry_run)
            print(f"[gpu_check] {step.__name__}: {'pass' if summary[step.__name__]['ok'] else 'FAIL'}", flush=True)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if path.suffix in (".log", ".xml", ".json") and path.is_file():
                    tar.add(path, arcname=str(path.relative_to(work)))
    summary["seconds"] = time.perf_counter() - start
    summary["ok"] = all(summary[s]["ok"] for s in ("tests", "federated", "bench"))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_check.md").write_text(markdown(summary))
    print((out / "gpu_check.md").read_text())
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
