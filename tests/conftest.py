"""Shared fixtures: tiny seeded checkpoints (built once per session) and a CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import ARCHITECTURES, make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_tiny_checkpoint(arch, root / arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


@pytest.fixture
def cli():
    """Invoke the Typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from exporter.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


TINY_RECIPE = """
schema_version = 1
name = "{name}"
[kv_cache]
max_seq_len = 128
max_prefill_len = 32
[bench]
prompt_lengths = [16, 32]
decode_tokens = 24
warmup = 1
runs = 2
{extra}
"""


def write_recipe(path: Path, name: str, extra: str = "") -> Path:
    path.write_text(TINY_RECIPE.format(name=name, extra=extra), encoding="utf-8")
    return path


def quant_rules(linear: str, *, embedding: str = "int8_weight", lm_head: str | None = None,
                group_size: int = 32, symmetric: bool = True) -> str:
    """Recipe rules: the embedding, then (optionally) lm_head on its own, then every linear layer."""
    def rule(match: str, kind: str, scheme: str) -> str:
        return (f'[[quant.rules]]\nmatch = "{match}"\nkind = "{kind}"\nscheme = "{scheme}"\n'
                f"group_size = {group_size}\nsymmetric = {'true' if symmetric else 'false'}\n")

    head = rule("lm_head", "linear", lm_head) if lm_head else ""
    return "\n" + rule("model.embed_tokens", "embedding", embedding) + head + rule("*", "linear", linear)


def eager_greedy_text(folder: Path, checkpoint: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """The float decoder's greedy continuation of ``prompt`` (tokens, text), tokenized and
    decoded as the artifact's runtime does: what `generate` on a float artifact must print."""
    from exporter.artifact import read_artifact
    from exporter.backends import get_backend
    from exporter.load import load_model
    from exporter.pipeline import recipe_of
    from exporter.quant.apply import float_decoder
    from exporter.runners import EagerRunner, greedy

    artifact = read_artifact(folder)
    backend = get_backend(artifact.target)
    encode, decode = backend.shipped_tokenizer(artifact)
    lm = float_decoder(load_model(checkpoint).model, recipe_of(artifact), backend)
    tokens = greedy(EagerRunner(lm), encode(prompt), max_new_tokens, set(artifact.manifest.model.eos_ids))
    return tokens, decode(tokens)
