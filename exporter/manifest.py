"""manifest.json as a typed record: what an artifact folder holds and how it was made.

Written once by ``pipeline.export``, read by every command that takes a folder (and by a
device farm checking it again). It records what went into the bytes and nothing about the
run that made them, so the same inputs give the same manifest (when and how long: export.json,
``ExportLog``). Version 3 (this one) moved ``created`` and ``timings_s`` out to export.json;
version 2 had the target's facts under ``target.info`` and the KV cache shape as named
fields; version-1 manifests are read by ``_from_version_1``, so artifacts exported before
still verify.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exporter.records import from_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 3
EXPORT_LOG = "export.json"


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """The checkpoint and what the on-device runner needs to know about it."""

    source: str
    checkpoint_dir: str
    weights_sha256: str
    architecture: str
    vocab_size: int
    n_layers: int
    hidden_size: int
    max_seq_len: int
    max_prefill_len: int
    bos_id: int  # -1: none
    eos_ids: tuple[int, ...]
    # A LoRA adapter merged into the source (exporter/adapters.py): its folder and digest, and
    # the base's weights digest (weights_sha256 is then the merged checkpoint's).
    adapter: str = ""
    adapter_sha256: str = ""
    base_weights_sha256: str = ""
    # The prompt prefix an app keeps in the KV cache (recipe task.cached_prefix), as ids of the
    # source tokenizer; empty: none.
    prompt_prefix_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, loaded, recipe, *, source: str, weights_sha256: str, adapter: dict | None = None,
           prompt_prefix_ids: Sequence[int] = ()) -> ModelFacts:
        config, tokenizer = loaded.config, loaded.tokenizer
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
        return cls(source=source, checkpoint_dir=str(loaded.checkpoint_dir), weights_sha256=weights_sha256,
                   architecture=loaded.architecture, vocab_size=config.vocab_size, n_layers=config.num_hidden_layers,
                   hidden_size=config.hidden_size, max_seq_len=recipe.kv_cache.max_seq_len,
                   max_prefill_len=recipe.kv_cache.max_prefill_len, bos_id=-1 if bos is None else int(bos),
                   eos_ids=tuple(sorted(int(e) for e in eos_ids)),
                   prompt_prefix_ids=tuple(int(t) for t in prompt_prefix_ids), **(adapter or {}))


@dataclass(frozen=True, kw_only=True)
class KVCacheShape:
    """The static cache: ``kinds`` (key, value) x ``layers`` buffers of [batch, max_seq_len,
    kv_heads, head_dim] (float32 unless ``dtype`` says otherwise; a target's own layout is in
    the io signature's ``state_layout``)."""

    layers: int
    kinds: int = 2
    batch: int = 1
    max_seq_len: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    # int8: "per_token" (a float32 scale and an int8 zero point stored with each position and
    # head) or "static" (fixed per-channel scales, constants of the program).
    scales: str = ""

    @classmethod
    def of(cls, lm, dtype: str = "float32", scales: str = "") -> KVCacheShape:
        s = lm.shape
        return cls(layers=s.n_layers, max_seq_len=lm.max_seq_len, kv_heads=s.n_kv_heads, head_dim=s.head_dim,
                   dtype=dtype, scales=scales)

    def bytes_at(self, positions: int) -> int:
        """Bytes of cache that hold ``positions`` positions (int8 with per-token scales: the
        codes, and a float32 scale and an int8 zero point per position and head)."""
        width = {"float32": 4, "float16": 2, "int8": 1}[self.dtype]
        row = width * self.head_dim + (5 if self.scales == "per_token" else 0)
        return self.layers * self.kinds * self.batch * positions * self.kv_heads * row


@dataclass(frozen=True, kw_only=True)
class IOSignature:
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    kv_cache: KVCacheShape
    state_layout: str = ""  # how the target holds the cache, when not as KVCacheShape says


def decoder_signature(lm, *, position_dtype: str, kv_cache: KVCacheShape | None = None,
                      state_layout: str = "") -> IOSignature:
    """``forward(tokens, input_pos) -> last-token logits`` over an in-program cache: the
    contract of the ExecuTorch and Core ML programs (they differ in integer width)."""
    return IOSignature(
        inputs=({"name": "tokens", "dtype": position_dtype, "shape": [1, f"seq_len<= {lm.max_prefill_len}"]},
                {"name": "input_pos", "dtype": position_dtype, "shape": [1], "meaning": "position of tokens[0]"}),
        outputs=({"name": "logits", "dtype": "float32", "shape": [1, lm.shape.vocab_size], "meaning": "last token"},),
        kv_cache=kv_cache or KVCacheShape.of(lm),
        state_layout=state_layout,
    )


@dataclass(frozen=True, kw_only=True)
class TargetFacts:
    name: str
    info: dict[str, Any]  # what the backend's lower() reported (opset, constant methods, ...)


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class ArtifactManifest:
    manifest_version: int = MANIFEST_VERSION
    name: str
    recipe: dict[str, Any]  # the resolved recipe (recipe_io.recipe_to_dict); recipe_io reads it back
    model: ModelFacts
    target: TargetFacts
    roles: dict[str, str]  # role -> file or folder ("program", "weights", "tokenizer", ...)
    io_signature: IOSignature
    quantization: dict[str, Any]  # QuantSummary.to_dict()
    environment: dict[str, Any]
    files: dict[str, FileEntry]

    def rule_for(self, module: str) -> dict[str, Any] | None:
        """The quantization rule entry that matched ``module``, if any."""
        return next((r for r in self.quantization["rules"] if module in r["modules"]), None)

    def bytes_of_role(self, *roles: str) -> int:
        """Bytes of the files a role names: one file, or every file of a folder role."""
        roots = [self.roles[role] for role in roles if role in self.roles]
        return sum(entry.bytes for rel, entry in self.files.items()
                   if any(rel == root or rel.startswith(root.rstrip("/") + "/") for root in roots))


@dataclass(frozen=True, kw_only=True)
class ExportLog:
    """export.json: when the artifact was made and how long each stage took (not in the
    manifest: the same inputs must give the same manifest bytes)."""

    created: str
    timings_s: dict[str, float]


def manifest_from_json(data: dict[str, Any]) -> ArtifactManifest:
    """Read a manifest of this version, 2 or 1; anything else raises ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("manifest_version")
    if version == 1:
        data = _from_version_1(data)
    elif version == 2:  # the same fields and created / timings_s, which are no longer read
        data = {**data, "manifest_version": MANIFEST_VERSION}
    elif version != MANIFEST_VERSION:
        raise ValueError(f"manifest_version {version!r} is not one this tool reads (1, 2 or {MANIFEST_VERSION})")
    return from_json(ArtifactManifest, data, "manifest")


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1: target facts beside name and backend, ExecuTorch's constant methods at the
    top, the KV cache as a positional list, other targets' option tables in the recipe."""
    data = dict(data)
    target = dict(data["target"])
    name = target.pop("name")
    target.pop("backend", None)
    constants = data.pop("runtime_constants", None)
    if name == "executorch" and constants is not None:
        target["constant_methods"] = constants
    data["target"] = {"name": name, "info": target}
    signature = dict(data["io_signature"])
    state = signature.pop("state")
    layers, kinds, batch, seq, kv_heads, head_dim = state["kv_cache"]
    signature["kv_cache"] = {"layers": layers, "kinds": kinds, "batch": batch, "max_seq_len": seq,
                             "kv_heads": kv_heads, "head_dim": head_dim}
    if "coreml_states" in state:
        signature["state_layout"] = state["coreml_states"]
    data["io_signature"] = signature
    recipe_target = dict(data["recipe"]["target"])
    data["recipe"] = {**data["recipe"],
                      "target": {"name": name, **({name: recipe_target[name]} if name in recipe_target else {})}}
    data["manifest_version"] = MANIFEST_VERSION
    return data
