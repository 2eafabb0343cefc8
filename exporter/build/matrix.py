"""The release matrix: a strict TOML file of models x recipes, resolved to the artifacts to build.

Each artifact is one (model, recipe) pair. Everything is checked here, before any work:
unknown keys and wrong types (with the dotted path, as recipes are), recipes that do not
load or that their target refuses, models that do not exist, duplicate names.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import RecipeError, UsageError

MATRIX_SCHEMA_VERSION = 1
# An artifact's folder name under --out: lowercase letters, digits, '.', '_' and '-'.
_SLUG = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True, kw_only=True)
class MatrixModel:
    name: str  # the first half of each artifact's id
    source: str  # a checkpoint folder, a .gguf file or builtin:NAME
    adapter: str = ""  # a PEFT LoRA adapter folder merged into the source
    recipes: tuple[str, ...] = ()  # only these of the matrix's recipes for this model (empty: all)


@dataclass(frozen=True, kw_only=True)
class VerifyBudget:
    """verify's budget (0: the recipe's own)."""

    prompts: int = 0
    decode_steps: int = 0
    greedy_tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class MatrixFile:
    schema_version: int = MATRIX_SCHEMA_VERSION
    models: tuple[MatrixModel, ...]
    recipes: tuple[str, ...]  # shipped recipe names or files (relative to the matrix file)
    set: tuple[str, ...] = ()  # recipe overrides for every artifact, as --set a.b=value
    devices: tuple[str, ...] = ()  # verified on after the host: arm64-emu, ssh://..., adb:SERIAL
    eval: str = ""  # the task section's eval set (builtin or a JSONL file); "": the recipe's task.eval
    sessions: int = 0  # eval sessions (0: the recipe's task.sessions)
    bench: bool = True  # bench each artifact on the host
    verify: VerifyBudget = field(default_factory=VerifyBudget)  # on the host
    device_verify: VerifyBudget = field(default_factory=lambda: VerifyBudget(prompts=2, decode_steps=8,
                                                                              greedy_tokens=8))


@dataclass(frozen=True, kw_only=True)
class PlannedArtifact:
    """One artifact of the build: its id (the folder under --out) and what makes it."""

    id: str
    model: MatrixModel
    recipe_ref: str  # as the matrix names it
    recipe_path: str  # the resolved file
    overrides: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class BuildPlan:
    matrix: MatrixFile
    artifacts: tuple[PlannedArtifact, ...]
    source: str  # the matrix file, or "command line"


def read_matrix(path: Path) -> MatrixFile:
    from exporter.recipe_io import table_to_record

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"matrix file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    try:
        matrix = table_to_record(MatrixFile, raw, "")
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}", hint="docs/ci.md describes the matrix file") from exc
    if matrix.schema_version != MATRIX_SCHEMA_VERSION:
        raise RecipeError(f"{path}: schema_version {matrix.schema_version} is not {MATRIX_SCHEMA_VERSION}")
    base = path.parent

    def local(ref: str) -> str:  # a file beside the matrix, else a shipped name
        return str(base / ref) if ref and (base / ref).exists() else ref

    models = tuple(MatrixModel(name=m.name, source=m.source if m.source.startswith("builtin:") else local(m.source),
                               adapter=local(m.adapter), recipes=tuple(local(r) for r in m.recipes))
                   for m in matrix.models)
    return MatrixFile(**{**matrix.__dict__, "models": models, "recipes": tuple(local(r) for r in matrix.recipes),
                         "eval": local(matrix.eval) if matrix.eval != "builtin" else matrix.eval})


def command_line_matrix(recipes: list[str], model: str | None, adapter: str | None, overrides: list[str],
                        devices: list[str], eval_set: str | None, sessions: int | None) -> MatrixFile:
    """`build RECIPE [RECIPE ...] --model PATH`: the same build without a matrix file."""
    source = model or ""
    return MatrixFile(models=(MatrixModel(name=model_name(source) if source else "recipe-model", source=source,
                                          adapter=adapter or ""),),
                      recipes=tuple(recipes), set=tuple(overrides), devices=tuple(devices),
                      eval=eval_set or "", sessions=sessions or 0)


def model_name(source: str) -> str:
    stem = source.removeprefix("builtin:").rstrip("/").split("/")[-1].removesuffix(".gguf")
    return slug(stem) or "model"


def slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-.")


def plan_build(matrix: MatrixFile, source: str) -> BuildPlan:
    """Every (model, recipe) pair, each recipe loaded and checked against its target now."""
    from exporter.backends.base import check_recipe
    from exporter.devices import get_device
    from exporter.recipe_io import load_recipe, resolve_recipe_path

    if not matrix.models:
        raise RecipeError(f"{source}: models: the matrix names no model")
    if not matrix.recipes:
        raise RecipeError(f"{source}: recipes: the matrix names no recipe")
    names = [m.name for m in matrix.models]
    for name in names:
        if slug(name) != name:
            raise RecipeError(f"{source}: models: name {name!r} must be lowercase letters, digits, '.', '_', '-' "
                              f"(for example {slug(name)!r})")
        if names.count(name) > 1:
            raise RecipeError(f"{source}: models: the name {name!r} is used twice")
    for device in matrix.devices:
        get_device(device)  # an unknown device is refused before any export
    if matrix.eval:
        from exporter.intent.evalset import read_eval_set

        read_eval_set(matrix.eval)  # a bad line is refused now, not after the first export
    artifacts = []
    for model in matrix.models:
        refs = model.recipes or matrix.recipes
        for ref in refs:
            recipe = load_recipe(ref, list(matrix.set))  # a bad recipe or override: exit 3 now
            check_recipe(recipe)  # what the target does not declare: exit 5 now
            if not (model.source or recipe.model.source):
                raise UsageError(f"{source}: model {model.name!r} names no source and recipe {ref!r} none either",
                                 hint="give the model a source (a checkpoint folder, .gguf or builtin:NAME)")
            _check_source(model.source or recipe.model.source, source)
            artifacts.append(PlannedArtifact(id=f"{model.name}--{slug(recipe.name)}", model=model, recipe_ref=ref,
                                             recipe_path=str(resolve_recipe_path(ref)), overrides=matrix.set))
    ids = [a.id for a in artifacts]
    for artifact_id in ids:
        if ids.count(artifact_id) > 1:
            raise RecipeError(f"{source}: two artifacts would share the folder {artifact_id!r} "
                              "(the same recipe name twice for one model)")
    return BuildPlan(matrix=matrix, artifacts=tuple(sorted(artifacts, key=lambda a: a.id)), source=source)


def _check_source(source: str, where: str) -> None:
    if source.startswith("builtin:"):
        from exporter.load import BUILTIN_ADAPTED, BUILTIN_MODELS

        name = source.removeprefix("builtin:")
        if name not in BUILTIN_MODELS and name not in BUILTIN_ADAPTED:
            known = ", ".join(f"builtin:{n}" for n in sorted({*BUILTIN_MODELS, *BUILTIN_ADAPTED}))
            raise UsageError(f"{where}: unknown model {source!r}", hint=f"the built-in models: {known}")
    elif not Path(source).expanduser().exists():
        raise UsageError(f"{where}: model {source!r} does not exist",
                         hint="pass a checkpoint folder, a .gguf file or builtin:NAME")


def shard(plan: BuildPlan, spec: str | None) -> BuildPlan:
    """``i/n``: the i-th of n deterministic slices (artifacts in id order, every n-th from i)."""
    if not spec:
        return plan
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise UsageError(f"--shard {spec!r} is not i/n with 1 <= i <= n", hint="for example --shard 2/4")
    i, n = int(match.group(1)), int(match.group(2))
    return BuildPlan(matrix=plan.matrix, artifacts=plan.artifacts[i - 1::n], source=plan.source)
