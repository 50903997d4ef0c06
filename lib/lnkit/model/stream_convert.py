"""``convert_llama_folder``: a Llama folder on disk to an all-parent ``nemotron-nas`` folder, one tensor at a time.

:func:`lnkit.model.convert.from_llama` converts a model in memory and builds the whole ``nemotron-nas`` model
first: a 70B parent would hold its 140 GB of bf16 weights twice. This reads a Hugging Face Llama folder
(``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``) and writes the folder
that :func:`lnkit.checkpoints.save_model` writes for ``from_llama(LlamaForCausalLM.from_pretrained(src))``: the
same ``config.json`` (:func:`~lnkit.model.convert.nas_config_from_llama`), the same tensors (weight names are
Llama's in both formats), the standalone modeling code and ``auto_map`` (:mod:`lnkit.model.standalone`), the
tokenizer files and ``generation_config.json`` when the source has them, and a manifest of checksums
(:mod:`lnkit.io`), so :func:`lnkit.checkpoints.load_model` verifies it before loading. (In bf16 the folder's
logits equal the bf16 Llama's own; ``from_llama`` of a bf16 model differs slightly, since its ``.to(bf16)`` also
rounds RoPE's ``inv_freq`` buffer, which ``from_pretrained`` keeps in fp32.)

How: every source header is read first (names, shapes, dtypes; no data) and checked against the tensors the
config needs (a model built on the meta device), so a missing or misshapen tensor fails before anything is
written. Tensors are planned into output shards of at most ``max_shard_bytes`` (a layer's tensors stay together
when the layer fits), then each shard is read tensor by tensor (a source file is open only while one of its
tensors is read), cast if asked, and written. Peak memory is about one output shard; the folder is built under a
temporary name beside ``dst`` and renamed into place (a crash leaves ``<dst>.tmp-*``, which
:func:`lnkit.io.clean_partial` on the parent folder removes). The manifest reads every written file once more
to hash it: at 70B, minutes on top of the copy.

Refused unless ``allow_lnkit_only=True``: a source NVIDIA's own DeciLM code would read differently from lnkit
(:func:`lnkit.model.export.deci_compatibility`: a ``head_dim`` other than hidden/heads, or an FFN width the
``ffn_mult`` rule does not give), since the released-format folder would then not load there. Llama-3
8B/70B/405B pass; most tiny test shapes need the flag.

Run: ``python -m lnkit.model.stream_convert SRC DST [--max-shard-bytes N] [--dtype bfloat16] [--overwrite]
[--allow-lnkit-only]``. Measured (tests/test_stream_convert.py, a 0.54 GB bf16 Llama in 64 MiB shards): the
conversion raises the process's peak RSS by 0.13x the model's bytes (1.03x with the whole model in one shard),
``from_llama`` of the loaded model by 2.1x.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from lnkit.io import atomic_dir
from lnkit.model.config import NemotronNasConfig
from lnkit.model.convert import nas_config_from_llama
from lnkit.model.export import DeciCompatibilityError, deci_compatibility
from lnkit.model.modeling import CheckpointMismatchError, NemotronNasForCausalLM
from lnkit.model.standalone import write_remote_code

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5_000_000_000  # the shard size of the released Llama / Llama-Nemotron folders
# Copied when present (never the weights, nor an ``original/`` folder of Meta's consolidated checkpoint).
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
               "merges.txt")
# Buffers older transformers saved with Llama weights; transformers drops them on load, so do we.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_llama_config(src: Path) -> LlamaConfig:
    """The source's ``LlamaConfig``; a missing ``config.json`` or another ``model_type`` is an error naming it."""
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {src} is not a Hugging Face model folder")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{path}: model_type={model_type!r}, expected 'llama' (convert_llama_folder converts "
                         "Llama folders only)")
    config = LlamaConfig.from_pretrained(src)
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        raise ValueError(f"{path}: pretraining_tp={config.pretraining_tp}: only 1 is supported (as in transformers)")
    return config


def weight_files(src: Path) -> dict[str, str]:
    """``{tensor name: file name}`` of the source weights, from its single safetensors file or else its index (the
    order transformers looks for them in)."""
    if (src / SINGLE).is_file():
        with safe_open(src / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)
    if (src / INDEX).is_file():
        return dict(json.loads((src / INDEX).read_text())["weight_map"])
    raise FileNotFoundError(f"{src} has neither {SINGLE} nor {INDEX} (only safetensors weights are read)")


def source_tensors(src: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """``{name: (file name, shape, safetensors dtype)}`` from the headers only; an index naming a file or a tensor
    that is not there is an error naming both."""
    files = weight_files(src)
    out = {}
    for file in sorted(set(files.values())):
        path = src / file
        if not path.is_file():
            raise FileNotFoundError(f"{src / INDEX} names {path}, which does not exist")
        with safe_open(path, framework="pt") as f:
            have = set(f.keys())
            for name in sorted(n for n, fn in files.items() if fn == file):
                if name not in have:
                    raise CheckpointMismatchError(f"{src / INDEX} puts tensor {name} in {path}, which does not hold it")
                s = f.get_slice(name)
                out[name] = (file, tuple(s.get_shape()), s.get_dtype())
    return out


def expected_shapes(config: NemotronNasConfig) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the tensors a saved model of ``config`` holds, in the model's order (built on meta)."""
    with torch.device("meta"):
        model = NemotronNasForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # saved folders hold the embedding only
    return shapes


def check_tensors(src: Path, found: dict, expected: dict, tied: bool) -> None:
    """Every expected tensor present with its shape, nothing else; the error names tensors, files and the config."""
    listing = src / SINGLE if (src / SINGLE).is_file() else src / INDEX
    problems = [f"{n} is missing from {listing}" for n in expected if n not in found]
    for n, (file, shape, dtype) in found.items():
        if n in expected and shape != expected[n]:
            problems.append(f"{n} in {src / file} has shape {list(shape)}, the config needs {list(expected[n])}")
        elif n in expected and dtype not in DTYPES:
            problems.append(f"{n} in {src / file} has dtype {dtype}; only float tensors are converted")
        elif n not in expected and not IGNORED.fullmatch(n) and not (tied and n == "lm_head.weight"):
            problems.append(f"{n} in {src / file} is not a tensor of this config")
    if problems:
        raise CheckpointMismatchError(f"{src} does not match its {src / 'config.json'} "
                                      f"({len(problems)} problem{'s' * (len(problems) > 1)}): " + "; ".join(problems))


def _group(name: str) -> str:
    """Tensors that share a group are kept in one shard when they fit: a layer's, or a tensor alone."""
    m = re.match(r"model\.layers\.\d+\.", name)
    return m.group(0) if m else name


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names (in order) cut into shards of at most ``max_shard_bytes``; a layer that fits in one shard is
    never split, a tensor larger than the limit gets a shard of its own.

    >>> sizes = {"emb": 6, "model.layers.0.a": 3, "model.layers.0.b": 3, "model.layers.1.a": 3, "norm": 1}
    >>> plan_shards(sizes, 7)
    [['emb'], ['model.layers.0.a', 'model.layers.0.b'], ['model.layers.1.a', 'norm']]
    >>> plan_shards({"emb": 9, "model.layers.0.a": 4, "model.layers.0.b": 4}, 6)
    [['emb'], ['model.layers.0.a'], ['model.layers.0.b']]
    """
    groups: dict[str, list[str]] = {}
    for name in sizes:
        groups.setdefault(_group(name), []).append(name)
    shards, current, used = [], [], 0
    for names in groups.values():
        size = sum(sizes[n] for n in names)
        parts = [names] if size <= max_shard_bytes else [[n] for n in names]
        for part in parts:
            part_size = sum(sizes[n] for n in part)
            if current and used + part_size > max_shard_bytes:
                shards.append(current)
                current, used = [], 0
            current, used = current + part, used + part_size
    return shards + [current] if current else shards


def _read(path: Path, name: str, dtype: torch.dtype | None) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:  # opened per tensor: no more than one tensor mapped at a time
        t = f.get_tensor(name)
    return (t if dtype is None else t.to(dtype)).contiguous()


def write_weights(src: Path, out: Path, found: dict, order: list[str], dtype: torch.dtype | None,
                  max_shard_bytes: int) -> None:
    """The tensors ``order`` names, read from ``src`` and written into ``out`` in shards, with an index if several."""
    sizes = {n: torch.Size(found[n][1]).numel() * (dtype or DTYPES[found[n][2]]).itemsize for n in order}
    shards = plan_shards(sizes, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(1, len(shards) + 1)]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file({n: _read(src / found[n][0], n, dtype) for n in shard}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total_parameters = sum(torch.Size(found[n][1]).numel() for n in order)
        index = {"metadata": {"total_size": sum(sizes.values()), "total_parameters": total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _float_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, or a floating torch dtype given as itself or by name.

    >>> _float_dtype("bfloat16"), _float_dtype(None)
    (torch.bfloat16, None)
    >>> _float_dtype("int8")
    Traceback (most recent call last):
    ValueError: dtype='int8': expected a floating torch dtype such as 'bfloat16'
    """
    d = dtype if isinstance(dtype, torch.dtype) or dtype is None else getattr(torch, str(dtype), None)
    if dtype is not None and not (isinstance(d, torch.dtype) and d.is_floating_point):
        raise ValueError(f"dtype={dtype!r}: expected a floating torch dtype such as 'bfloat16'")
    return d


def convert_llama_folder(src: str | Path, dst: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                         dtype: torch.dtype | str | None = None, overwrite: bool = False,
                         allow_lnkit_only: bool = False) -> Path:
    """Write the all-parent ``nemotron-nas`` folder of the Hugging Face Llama folder ``src`` to ``dst``.

    ``dtype`` (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``) casts every tensor; by default each keeps the
    source's. An existing ``dst`` is an error unless ``overwrite``; then it is replaced only once the new folder
    is complete. A source NVIDIA's DeciLM code would read differently
    (:func:`~lnkit.model.export.deci_compatibility`) is a :class:`~lnkit.model.export.DeciCompatibilityError`
    unless ``allow_lnkit_only``. Source problems (no ``config.json``, not a Llama, an index naming a tensor its file
    lacks, a tensor missing, extra or of the wrong shape) are errors naming the file, before anything is written.
    """
    src, dst, dtype = Path(src), Path(dst), _float_dtype(dtype)
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: expected a positive integer")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"dst {dst} is the source folder; write the conversion elsewhere")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    config = nas_config_from_llama(read_llama_config(src))
    if not allow_lnkit_only and (problems := deci_compatibility(config)):
        raise DeciCompatibilityError(
            f"{src / 'config.json'}: NVIDIA's DeciLM code would read the converted config differently from lnkit, "
            "so the folder would not load there:\n  - " + "\n  - ".join(problems)
            + "\npass allow_lnkit_only=True (--allow-lnkit-only) to write it for lnkit only")
    found, expected = source_tensors(src), expected_shapes(config)
    check_tensors(src, found, expected, config.tie_word_embeddings)
    config.dtype = dtype or DTYPES[found["model.embed_tokens.weight"][2]]
    with atomic_dir(dst) as tmp:
        write_weights(src, tmp, found, list(expected), dtype, max_shard_bytes)
        config.save_pretrained(tmp)
        write_remote_code(tmp)  # as lnkit.checkpoints.save_model does: loads with trust_remote_code, no lnkit
        for name in EXTRA_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lnkit.model.stream_convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a Hugging Face Llama folder (config.json + safetensors)")
    p.add_argument("dst", help="the nemotron-nas folder to write")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    p.add_argument("--dtype", default=None, help="cast every tensor, e.g. bfloat16 (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    p.add_argument("--allow-lnkit-only", action="store_true",
                   help="write a config NVIDIA's DeciLM code would read differently (see deci_compatibility)")
    a = p.parse_args(argv)
    try:
        out = convert_llama_folder(a.src, a.dst, a.max_shard_bytes, a.dtype, a.overwrite, a.allow_lnkit_only)
    except (OSError, ValueError, CheckpointMismatchError) as e:  # the message names the file and the fix
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
