"""Is a weight file what its name says? A safetensors file starts with an 8-byte little-endian header
length and that many bytes of JSON that describe every tensor; a pickle (``pytorch_model.bin``, or one
renamed ``model.safetensors``) does not. Only the header is read, never the tensors, so a folder of
many gigabytes is checked in milliseconds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors library refuses a larger header too."""
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def header_problem(read: BinaryIO, size: int) -> str | None:
    """Why the file open in ``read`` (``size`` bytes) is not a safetensors file, or None when its header
    parses: a JSON object whose tensors each give ``dtype``, ``shape`` and ``data_offsets`` that lie
    inside the file."""
    head = read.read(8)
    if size < 8 or len(head) < 8:
        return f"is {size} bytes long, shorter than a safetensors header"
    (length,) = struct.unpack("<Q", head)
    if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
        return (f"does not start with a safetensors header (its first 8 bytes give a header of {length} bytes "
                f"in a file of {size}); it may be a pickle")
    try:
        header = json.loads(read.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "has a safetensors header that is not JSON; it may be a pickle"
    if not isinstance(header, dict):
        return "has a safetensors header that is not a JSON object"
    data_bytes = size - 8 - length
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes or "dtype" not in tensor
                or not isinstance(tensor.get("shape"), list)):
            return f"has a safetensors header whose tensor {name[:80]!r} is malformed or lies outside the file"
    return None


def file_problem(path: Path) -> str | None:
    """:func:`header_problem` of a local file, or why it cannot be read."""
    try:
        with open(path, "rb") as read:
            return header_problem(read, path.stat().st_size)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"


def shard_names(index_text: str) -> list[str] | str:
    """The shard files a ``model.safetensors.index.json`` names, or why it cannot be used: each must be a
    plain ``*.safetensors`` file name in the same folder (no ``/``, no ``..``)."""
    try:
        weight_map = json.loads(index_text).get("weight_map")
    except (ValueError, AttributeError):
        return f"{SHARD_INDEX} is not a JSON object"
    if not isinstance(weight_map, dict) or not weight_map:
        return f"{SHARD_INDEX} has no weight_map"
    names = sorted({str(name) for name in weight_map.values()})
    for name in names:
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".safetensors"):
            return f"{SHARD_INDEX} names {name[:200]!r}; each shard must be a *.safetensors file in the model's folder"
    return names


def weights_problem(names: Iterable[str], read_header: Callable[[str], str | None],
                    read_text: Callable[[str], str], *, nested: bool = False) -> str | None:
    """Why a model folder holding the files ``names`` (relative) has no usable safetensors weights, or None.

    Every ``*.safetensors`` file (at the top, or anywhere with ``nested``) must pass :func:`header_problem`
    (``read_header`` runs it on one file), and each shard a ``model.safetensors.index.json`` names must be one
    of them; weights only in pickle files (``.bin``, ``.pt``, ...) are refused, since loading a pickle runs
    code."""
    names = sorted(set(names))
    tensors = [name for name in names if name.endswith(".safetensors") and (nested or "/" not in name)]
    if not tensors:
        pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
        found = f" (found {', '.join(pickles[:5])}: pickle files, which are never loaded)" if pickles else ""
        return (f"has no *.safetensors weights{found}; align loads safetensors only: convert the weights with "
                "`transformers` save_pretrained(safe_serialization=True)")
    if SHARD_INDEX in names:
        shards = shard_names(read_text(SHARD_INDEX))
        if isinstance(shards, str):
            return shards
        missing = [name for name in shards if name not in tensors]
        if missing:
            return f"{SHARD_INDEX} names {', '.join(missing[:5])}, which the folder does not hold"
    for name in tensors:
        problem = read_header(name)
        if problem is not None:
            return f"{name} {problem}; align loads safetensors only, never pickles"
    return None


def folder_weights_problem(folder: Path) -> str | None:
    """:func:`weights_problem` for a local model folder (its top-level files; symlinks followed)."""
    names = [child.name for child in folder.iterdir() if child.is_file()]
    return weights_problem(names, lambda name: file_problem(folder / name),
                           lambda name: (folder / name).read_text(errors="replace"))


def artifact_weights_problem(artifact_root: str, reference: str) -> str | None:
    """:func:`weights_problem` for a published artifact (``artifact:<id>``) in the store at ``artifact_root``,
    reading the headers of the files its manifest lists, local or remote; nothing else is fetched."""
    from align.artifacts import ArtifactError, ArtifactStore

    store = ArtifactStore(artifact_root)
    try:
        artifact = store.get(reference)
    except ArtifactError as error:
        return f"cannot be read from the artifact store: {error}"

    def read_header(name: str) -> str | None:
        path = f"{artifact.uri}/{name}"
        try:
            with store.fs.open(path, "rb") as read:
                return header_problem(read, int(store.fs.size(path)))
        except (OSError, ValueError) as error:
            return f"cannot be read: {error}"

    def read_text(name: str) -> str:
        with store.fs.open(f"{artifact.uri}/{name}", "rb") as read:
            return read.read(MAX_HEADER_BYTES).decode("utf-8", errors="replace")

    return weights_problem(artifact.manifest.files, read_header, read_text, nested=True)
