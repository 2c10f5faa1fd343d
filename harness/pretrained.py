"""Continued pretraining from released weights (``model.init_from=<dir>``).

``<dir>`` is a Hugging Face checkpoint directory as ``save_pretrained`` and ``python -m harness.export``
write it: one ``model.safetensors``, or shards listed by ``model.safetensors.index.json``, and
(usually) the tokenizer. :func:`check_pretrained` compares the files' headers with the configured
model before anything is built; :func:`load_pretrained` fills a built, possibly sharded, model from
them, each rank reading only its slices. The run's own schedule starts at step 0.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
import time
from dataclasses import replace

import torch

from harness.config import ModelConfig, TokenizerConfig
from harness.errors import CheckpointError, ConfigError

log = logging.getLogger("harness")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors dtypes that load into the model's fp32 parameters (converted on copy)
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_MAX_HEADER = 100 * 2**20  # bytes; a larger header is a corrupt file


def tokenizer_config(model: ModelConfig, tokenizer: TokenizerConfig) -> TokenizerConfig:
    """``tokenizer`` with ``path`` set to ``model.init_from`` when it is unset (the export writes the
    tokenizer beside the weights); ``tokenizer`` unchanged otherwise.

    Raises:
        ConfigError: ``tokenizer.path`` is unset and the ``model.init_from`` directory holds no tokenizer.
    """
    if model.init_from and not tokenizer.path:
        if os.path.isdir(model.init_from) and not any(
            os.path.isfile(os.path.join(model.init_from, name)) for name in TOKENIZER_FILES
        ):
            raise ConfigError(
                f"model.init_from={model.init_from} holds no tokenizer ({' / '.join(TOKENIZER_FILES)}) "
                "and tokenizer.path is unset; set tokenizer.path to the checkpoint's tokenizer"
            )
        return replace(tokenizer, path=model.init_from)
    return tokenizer


# what a save_pretrained tokenizer directory holds (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of ``path``: the files its index lists, else ``model.safetensors``.

    Raises:
        CheckpointError: ``path`` is not a directory, holds neither file, or its index lists a file that
            is not there.
    """
    where = f"model.init_from={path}"
    if not os.path.isdir(path):
        raise CheckpointError(f"{where} is not a directory")
    if os.path.isfile(os.path.join(path, INDEX)):
        names = sorted(set(_weight_map(path).values()))
        for name in names:
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{where}: {INDEX} lists {name}, which is not in the directory")
        return [os.path.join(path, n) for n in names]
    if os.path.isfile(os.path.join(path, SINGLE)):
        return [os.path.join(path, SINGLE)]
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))[:3]
    raise CheckpointError(
        f"{where} holds no {SINGLE} or {INDEX} (a directory save_pretrained or python -m harness.export "
        f"writes){'; it has ' + ', '.join(found) if found else ''}"
    )


def _weight_map(path: str) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> file name).

    Raises:
        CheckpointError: the index is not JSON or has no ``weight_map`` object of strings.
    """
    index = os.path.join(path, INDEX)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("a file name is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"model.init_from: {index} is not a safetensors index ({type(e).__name__}: {e}); "
            'save_pretrained writes {"weight_map": {tensor name: file name}}'
        ) from e
    return weight_map


def read_headers(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (safetensors dtype, shape)`` of every tensor under ``path``, in file order, read from
    the headers only (the first 8 + header-length bytes of each file; no tensor data).

    Raises:
        CheckpointError: see :func:`safetensors_files`, or a file whose header is not safetensors.
    """
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in safetensors_files(path):
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                if not 0 < n <= _MAX_HEADER:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
                end = max(
                    (info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0
                )
                size = os.path.getsize(file)
                if 8 + n + end > size:  # a cut copy: its header lists data the file does not hold
                    raise ValueError(
                        f"truncated: its header needs {8 + n + end:,} bytes, the file has {size:,}"
                    )
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"model.init_from: {file} is not a safetensors file ({e})") from e
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (info["dtype"], tuple(info["shape"]))
    return out


def expected_tensors(model: ModelConfig, vocab_size: int) -> tuple[dict[str, tuple[int, ...]], str]:
    """``(name -> shape`` of the tensors a checkpoint of the configured model holds, the input
    embedding's name)``, from the model built on the meta device (no memory, any size). A tied output
    layer (``lm_head.weight`` with ``model.tie_word_embeddings``) is not in the file."""
    from harness.model import build_model

    net = build_model(model, vocab_size, seed=0, device="meta")
    names = {id(p): n for n, p in net.named_parameters()}
    embedding = names[id(net.get_input_embeddings().weight)]
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if model.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes, embedding


def check_pretrained(model: ModelConfig, vocab_size: int) -> None:
    """Refuse a ``model.init_from`` checkpoint that does not fit the configured model, before any
    model exists: tensor names, shapes ([rows, ...]) and dtypes from the safetensors headers against
    :func:`expected_tensors`, in the model's order, then tensors the model does not have.

    Raises:
        ConfigError: one line naming the first offending tensor (and both shapes): a missing or
            unexpected tensor, another shape, embedding rows that differ from ``vocab_size`` (the
            vocabulary: ``model.vocab_size`` / the tokenizer), a dtype that is not a float.
        CheckpointError: no safetensors checkpoint at ``model.init_from`` (see :func:`read_headers`).
    """
    path = model.init_from
    found = read_headers(path)
    expected, embedding = expected_tensors(model, vocab_size)
    where = f"model.init_from={path}"
    for name, shape in expected.items():
        if name not in found:
            hint = "; set model.tie_word_embeddings=true" if name == "lm_head.weight" else ""
            raise ConfigError(f"{where} has no tensor {name} (the configured model's is {list(shape)}){hint}")
        dtype, got = found[name]
        if name == embedding and got[1:] == shape[1:] and got[0] != shape[0]:
            source = f"model.vocab_size={model.vocab_size}" if model.vocab_size else "from the tokenizer"
            raise ConfigError(
                f"{where}: {name} is {list(got)} there, {list(shape)} in the configured model: a vocabulary "
                f"of {got[0]} rows there, {shape[0]} here ({source}); set model.vocab_size={got[0]} and use "
                "the checkpoint's tokenizer (leave tokenizer.path unset)"
            )
        if got != shape:
            raise ConfigError(
                f"{where}: {name} is {list(got)} there, {list(shape)} in the configured model; configure the "
                "checkpoint's shape (model.hidden_size, model.num_layers, model.num_heads, ...)"
            )
        if dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"{where}: {name} is {dtype}; only float tensors ({', '.join(FLOAT_DTYPES)}) load into the "
                "model's fp32 parameters"
            )
    for name, (_, got) in found.items():
        if name not in expected:
            hint = "; set model.tie_word_embeddings=false" if name == "lm_head.weight" else ""
            raise ConfigError(
                f"{where} has a tensor {name} {list(got)} the configured model does not have{hint}"
            )


def tensor_files(path: str) -> dict[str, str]:
    """``name -> safetensors file`` of every tensor under ``path`` (from the index when there is one,
    else from ``model.safetensors``'s header).

    Raises:
        CheckpointError: see :func:`safetensors_files`.
    """
    if os.path.isfile(os.path.join(path, INDEX)):
        safetensors_files(path)  # every listed file is there
        return {k: os.path.join(path, v) for k, v in _weight_map(path).items()}
    return dict.fromkeys(read_headers(path), os.path.join(path, SINGLE))


def local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``(the tensor this rank holds, its block of the full tensor as slices)``: for a DTensor its local
    shard and the shard's offsets and lengths in every dimension (any mesh and placements, FSDP2's and
    tensor parallelism's alike); for a plain tensor itself and the whole range."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """Fill every tensor of ``model.state_dict()`` in place from the safetensors checkpoint at ``path``
    (checked by :func:`check_pretrained`), converting bf16/fp16/fp64 to the parameters' dtype. No
    collective: every rank of any layout calls it on its own.

    The parameters may be plain tensors or DTensors (FSDP2 ``Shard(0)``, tensor-parallel colwise
    ``Shard(0)`` / rowwise ``Shard(1)``, 2-D tp x dp_shard). What each rank reads: the header of each
    file (names, dtypes, shapes: ``safe_open``), then per tensor only the block its shard covers
    (:func:`local_block`), through ``safe_open(...).get_slice(name)[block]`` on the memory-mapped file:
    rows ``[r * ceil(n / d), (r + 1) * ceil(n / d))`` of an ``n``-row ``Shard(0)`` tensor over ``d`` ranks,
    that column range of every row for ``Shard(1)``, the whole tensor for a replicated one (one process,
    DDP, DeepSpeed before its engine, norms under tensor parallelism). Peak extra memory: one block in
    the file's dtype. A tied ``lm_head.weight`` is the embedding's tensor: not in the file, filled with it.
    (torch.distributed.checkpoint's ``HuggingFaceStorageReader`` reads slices the same way in torch 2.13,
    but earlier versions deserialized each whole file on every rank, and its load plan is a collective.)

    Raises:
        CheckpointError: a tensor of the model is not in the checkpoint (run :func:`check_pretrained`
            first for the full check).
    """
    from safetensors import safe_open

    from harness.weights import canonical_name

    # names as in the bare transformers model (activation checkpointing / compile wrappers removed);
    # under ZeRO-3 ``model`` is a one-parameter view (harness.weights.parameter_view), without config
    state = {canonical_name(k): v for k, v in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    files = tensor_files(path)
    missing = [name for name in state if name not in files]
    if missing:
        raise CheckpointError(f"model.init_from={path} has no tensor {missing[0]}")
    by_file: dict[str, list[str]] = {}
    for name in state:
        by_file.setdefault(files[name], []).append(name)
    start, read = time.perf_counter(), 0
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    local, block = local_block(state[name])
                    if local.numel():
                        part = f.get_slice(name)[block]
                        local.copy_(part)
                        read += part.numel() * part.element_size()
    # one line per model; ZeRO-3 fills one parameter at a time (a line each would be hundreds)
    log.log(
        logging.INFO if len(state) > 1 else logging.DEBUG,
        "model.init_from=%s: %d tensors from %d file(s), %s of the checkpoint's %s bytes read on this rank "
        "(%.1f s); the schedule starts at step 0",
        path,
        len(state),
        len(by_file),
        f"{read:,}",
        f"{_tensor_bytes(path):,}",
        time.perf_counter() - start,
    )


def _tensor_bytes(path: str) -> int:
    """Bytes of all tensor data under ``path`` (from the headers)."""
    size = {
        "F64": 8,
        "I64": 8,
        "U64": 8,
        "F32": 4,
        "I32": 4,
        "U32": 4,
        "BF16": 2,
        "F16": 2,
        "I16": 2,
        "U16": 2,
    }
    return sum(size.get(dtype, 1) * math.prod(shape) for dtype, shape in read_headers(path).values())
