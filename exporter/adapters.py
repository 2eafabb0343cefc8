"""A PEFT (LoRA) adapter merged into its base checkpoint: a checkpoint folder of its own.

``merge_adapter(base, adapter)`` loads the base in float32, applies the adapter with PEFT,
merges it into the weights (``merge_and_unload``) and saves the result, with the base's
tokenizer, once per (base weights, adapter) pair under the cache
(``~/.cache/recgpt-export/merged/``); every later stage sees an ordinary checkpoint. Only
safetensors adapters are read (a pickled ``adapter_model.bin`` is refused, as pickled
checkpoints are), and an adapter whose shapes do not fit the base is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from exporter.errors import ModelError, UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 over the adapter's config and weights."""
    from exporter.artifact import sha256_file

    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode())
        h.update(bytes.fromhex(sha256_file(adapter_dir / name)))
    return h.hexdigest()


def check_adapter(adapter_dir: Path) -> dict:
    """The adapter's config, after checking the folder holds a safetensors PEFT adapter."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UsageError(f"adapter {adapter_dir} is not a folder", hint="pass the folder PEFT's save_pretrained wrote")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = adapter_dir / "adapter_model.bin"
        if pickled.is_file():
            raise ModelError(f"{pickled} is a pickle; recgpt-export never unpickles weights",
                             hint="save the adapter with save_pretrained(dir, safe_serialization=True)")
        raise ModelError(f"adapter {adapter_dir} has no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"adapter {adapter_dir} has no {ADAPTER_CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{adapter_dir / ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"adapter {adapter_dir}: peft_type {config.get('peft_type')!r}; LoRA adapters are merged")
    return config


def merge_adapter(base_dir: Path, adapter_dir: Path, *, base_digest: str, cache_dir: Path,
                  on_progress: Callable[[str], None] | None = None) -> Path:
    """The checkpoint folder of ``base_dir`` (weights digest ``base_digest``) with
    ``adapter_dir`` merged in, made once under ``cache_dir``/merged."""
    from exporter.artifact import atomic_dir

    adapter_dir = Path(adapter_dir).resolve()
    check_adapter(adapter_dir)
    digest = adapter_digest(adapter_dir)
    target = Path(cache_dir) / "merged" / f"{base_digest[:16]}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    if on_progress:
        on_progress(f"merging the adapter {adapter_dir.name} into {base_dir.name} (once; cached in {target})")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    try:
        merged = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, modules the base lacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"adapter {adapter_dir} does not fit the base {base_dir}: {first[:300]}",
                         hint="pass the base checkpoint the adapter was trained on") from None
    merged = merged.to(torch.float32)
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir, local_files_only=True).save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"base": str(base_dir), "base_weights_sha256": base_digest, "adapter": str(adapter_dir),
             "adapter_sha256": digest}, indent=2) + "\n")
    return target


def adapter_facts(checkpoint: Path) -> dict | None:
    """What the manifest records of a merged adapter (the SOURCE.json merge_adapter writes), or None."""
    record = checkpoint / "SOURCE.json"
    source = json.loads(record.read_text()) if record.is_file() else {}
    if "adapter" not in source:
        return None
    return {"adapter": source["adapter"], "adapter_sha256": source["adapter_sha256"],
            "base_weights_sha256": source["base_weights_sha256"]}
