"""Property-based fuzz of the readers of user input: recipes (TOML and --set), intent eval
sets (JSONL) and manifests (JSON). Whatever the input, a reader returns or raises the tool's
own error (RecgptError: one line and an exit code), never anything else."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.errors import RecgptError

# A real manifest (the tiny Qwen3 for onnx with an int8 cache), the base the manifest fuzz edits.
MANIFEST = Path(__file__).parent / "data" / "manifest.json"

# JSON-like values, nested a little: what a TOML table or a JSON line can hold.
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                             inner, max_size=4),
                      max_leaves=12)
KEYS = st.sampled_from(["name", "schema_version", "model", "kv_cache", "quant", "target", "parity", "bench", "task",
                        "source", "max_seq_len", "dtype", "rules", "match", "scheme", "group_size", "executorch",
                        "cached_prefix", "sessions", "budget", "template", "x"])
# Dicts shaped like recipes: the known keys with any value, so the fuzz gets past the top level.
RECIPE_LIKE = st.recursive(st.dictionaries(KEYS, VALUES, max_size=6),
                           lambda inner: st.dictionaries(KEYS, inner | VALUES, max_size=6), max_leaves=20)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tool_error_or_value(call):
    try:
        return call()
    except RecgptError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))  # one line
        return None


@FUZZ
@given(RECIPE_LIKE)
def test_the_recipe_reader_refuses_any_dict_with_its_own_error(raw):
    from exporter.recipe_io import recipe_from_dict

    tool_error_or_value(lambda: recipe_from_dict(raw))


@FUZZ
@given(st.text(max_size=300), st.lists(st.text(max_size=30), max_size=3))
def test_the_recipe_file_reader_refuses_any_text(tmp_path_factory, text, overrides):
    from exporter.recipe_io import load_recipe

    path = tmp_path_factory.mktemp("r") / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    tool_error_or_value(lambda: load_recipe(path, overrides))


@FUZZ
@given(st.lists(st.one_of(VALUES.map(json.dumps), st.text(max_size=40),
                          st.fixed_dictionaries({"id": SCALARS, "behaviours": VALUES, "next_query": SCALARS},
                                                optional={"prefix": SCALARS}).map(json.dumps)), max_size=5))
def test_the_eval_set_reader_refuses_any_lines(tmp_path_factory, lines):
    from exporter.intent.evalset import read_eval_set

    path = tmp_path_factory.mktemp("e") / "eval.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    tool_error_or_value(lambda: read_eval_set(path))


@FUZZ
@given(st.data())
def test_the_manifest_reader_refuses_any_json(tmp_path_factory, data):
    """A real manifest with one part replaced by anything, or any JSON at all."""
    from exporter.artifact import read_artifact

    base = json.loads(MANIFEST.read_text(encoding="utf-8"))
    if data.draw(st.booleans()):
        path = data.draw(st.sampled_from(_paths(base)))
        _replace(base, path, data.draw(VALUES))
        document = base
    else:
        document = data.draw(VALUES | RECIPE_LIKE)
    folder = tmp_path_factory.mktemp("a")
    (folder / "manifest.json").write_text(json.dumps(document), encoding="utf-8")
    tool_error_or_value(lambda: read_artifact(folder, check_hashes=False))


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _replace(document, path: tuple, value) -> None:
    for part in path[:-1]:
        document = document[part]
    document[path[-1]] = value
