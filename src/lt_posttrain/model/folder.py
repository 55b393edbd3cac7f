"""A local Hugging Face model folder, checked before transformers reads it: a missing or malformed ``config.json``,
a tokenizer file that is not JSON, a truncated or corrupt safetensors file is one line naming the file, not one of
the dozen exceptions transformers, tokenizers and safetensors raise for them (or, for a shard that is not there, a
model that loads with random weights)."""

import json
import struct
from pathlib import Path
from typing import Optional

JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "special_tokens_map.json", "model.safetensors.index.json", "adapter_config.json")  # fmt: skip
"""The JSON files of a model folder that transformers reads when they are there."""


def folder_problem(folder: str, needs_config: bool = True, needs_weights: bool = False) -> Optional[str]:
    """What is wrong with the model folder ``folder`` (None if nothing, or if it is not a local folder): ``config.json``
    missing (with ``needs_config``), a JSON file malformed, a safetensors file truncated or corrupt, an index that
    names a shard that is not there (with ``needs_weights``)."""
    path = Path(folder)
    if not path.is_dir():
        return None
    if needs_config and not (path / "config.json").is_file():
        return "no config.json in it (a Hugging Face model folder holds config.json, the weights and the tokenizer)"
    for name in JSON_FILES:
        problem = _json_problem(path / name)
        if problem:
            return problem
    if not needs_weights:
        return None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        shards = sorted({str(shard) for shard in weight_map.values()}) if isinstance(weight_map, dict) else []
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            return f"{index.name} names {missing[0]}, which is not in the folder: copy the whole model"
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return problem
    return None


def _json_problem(file: Path) -> Optional[str]:
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"{file.name} is not text (corrupt?): replace it with the model's own"
    except json.JSONDecodeError as error:
        return f"{file.name} is not valid JSON ({error.msg} at line {error.lineno}): replace it with the model's own"
    if not isinstance(value, dict):
        return f"{file.name} must hold a JSON object, not {type(value).__name__}: replace it with the model's own"
    return None


def safetensors_problem(file: Path) -> Optional[str]:
    """Why ``file`` is not a whole safetensors file (None if it is): its header (an 8-byte length, then JSON naming
    each tensor's byte range) must be readable and its tensors must end where the file ends."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{file.name} is empty or truncated ({size} bytes): copy or download it again"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 * 2**20:
            return f"{file.name} is not a safetensors file, or is truncated (its header is cut off): copy it again"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{file.name} is not a safetensors file (corrupt header): copy or download it again"
    if not isinstance(header, dict):
        return f"{file.name} is not a safetensors file (corrupt header): copy or download it again"
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        return f"{file.name} is not a safetensors file (corrupt header): copy or download it again"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        what = "truncated" if size < expected else "longer than its tensors"
        return f"{file.name} is {what} ({size} bytes, its header says {expected}): copy or download it again"
    return None
