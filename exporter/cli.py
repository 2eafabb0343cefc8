"""The `recgpt-export` command line: parse, call the library, render, map errors to exit codes.

Exit codes: 0 success; 1 a parity gate failed (verify); 2 usage or input error (bad
arguments, missing file or folder, bad artifact); 3 bad recipe; 4 checkpoint refused or
unreadable; 5 unsupported for the target; 6 missing optional dependency; 8 a stage failed
unexpectedly; 9 the output could not be written (disk full); 130 interrupted (docs/errors.md).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from exporter.errors import RecgptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export a trained causal LM to on-device formats and prove the artifact still works.")
recipes_app = typer.Typer(no_args_is_help=True, help="List and show the shipped recipes.")
app.add_typer(recipes_app, name="recipes")
intent_app = typer.Typer(no_args_is_help=True, help="The intent workload: behaviour sessions and next-query eval.")
app.add_typer(intent_app, name="intent")
device_app = typer.Typer(no_args_is_help=True, help="Set up, list and remove the devices verify and bench can run on.")
app.add_typer(device_app, name="device")

out_console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one error, one line
_state = {"debug": False}

ArtifactDir = Annotated[Path, typer.Argument(help="An artifact folder written by `recgpt-export export`.")]
JsonFlag = Annotated[bool, typer.Option("--json",
                                        help="Print the report as JSON (the same JSON written to the file).")]
SSH_SPEC = escape("ssh://[user@]host[:port]")  # help text is rich markup: the brackets must print
DeviceOpt = Annotated[str, typer.Option("--device", "-d",
                                        help=f"Where the artifact runs: host, arm64-emu, {SSH_SPEC} or "
                                             "adb:SERIAL (the last three after `recgpt-export device setup ...`).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m",
                                              help="Checkpoint folder, .gguf file or builtin:NAME; "
                                                   "default: the recipe's model.source.")]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors, and the runtimes' "
                                                             "own C++ log lines.")] = False) -> None:
    _state["debug"] = debug
    if debug:  # the runtimes' own C++ logs too (runners.quiet_native_stderr)
        os.environ["RECGPT_NATIVE_LOGS"] = "1"
    # A non-interactive shell starts background jobs with SIGINT ignored and children inherit
    # it; an export must still stop cleanly, leaving nothing behind, when sent SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not debug:
        from exporter.quiet import quiet_libraries

        quiet_libraries()


class StageProgress:
    """Prints each stage on stderr with the time since the command started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        err_console.print(f"[dim][{time.perf_counter() - self.t0:7.1f}s][/dim] {message}", highlight=False)


def run(fn):
    """Call ``fn`` and turn known errors into one line + hint + exit code."""
    try:
        return fn()
    except RecgptError as exc:
        if _state["debug"]:
            raise
        # The message is text, not markup: "[user@]host" or "[quant.tuning]" must print as written.
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False)
        raise typer.Exit(exc.exit_code) from exc
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/bold red]: nothing was left half-written")
        # Not typer.Exit: when the interrupt lands inside code that a C extension runs with
        # PyRun_* (torch's import does, via pybind11), CPython flags it as unhandled even
        # though we handled it, and after a normal exit kills itself with SIGINT: the caller
        # then sees -2, not 130 (caught by tests/test_executorch_e2e.py on a loaded machine).
        # The partial folder is already gone (the pipeline's own cleanup ran), so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


@app.command()
def export(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or a shipped recipe name such as "
                                               "smollm2-135m/executorch-xnnpack-int4.")],
    model: ModelOpt = None,
    adapter: Annotated[Path | None, typer.Option(
        "--adapter", help="A PEFT LoRA adapter folder (safetensors) merged into --model; "
                          "the manifest records both hashes.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Artifact folder to create (default: out/<recipe name>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set",
                                                   help="Override a recipe field, "
                                                        "e.g. --set kv_cache.max_seq_len=1024 (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the artifact folder if it exists.")] = False,
) -> None:
    """Build an artifact folder: the program, the tokenizer and manifest.json. Written atomically."""
    from exporter.pipeline import export as do_export
    from exporter.recipe_io import load_recipe

    def go():
        r = load_recipe(recipe, set_ or [])
        folder = do_export(r, out_dir=out or Path("out") / r.name, model=model,
                           adapter=str(adapter) if adapter else None, force=force, progress=StageProgress())
        out_console.print(f"wrote {folder}")

    run(go)


@app.command()
def verify(
    folder: ArtifactDir, model: ModelOpt = None, json_: JsonFlag = False, device: DeviceOpt = "host",
    prompts: Annotated[int | None, typer.Option(help="Prompts to score "
                                                     "(default: the recipe's parity.prompts).")] = None,
    decode_steps: Annotated[int | None, typer.Option(help="Teacher-forced steps per prompt "
                                                          "(default: the recipe's parity.decode_steps).")] = None,
    greedy_tokens: Annotated[int | None, typer.Option(help="Free-running greedy tokens per prompt "
                                                           "(default: the recipe's parity.greedy_tokens).")] = None,
    eval_set: Annotated[str | None, typer.Option(
        "--eval", help="Add the task section on an intent eval set: builtin or a JSONL file "
                       "(default: the recipe's task.eval; docs/intent.md).")] = None,
    sessions: Annotated[int | None, typer.Option(help="Eval sessions scored (default: the recipe's "
                                                      "task.sessions).")] = None,
) -> None:
    """Check parity (tokenizer, lowering, quality, greedy); write DIR/parity.json. Exit 1 if a gate fails.

    Recipes that quantize activations at run time also get the reference's own noise floor
    measured, and lowering is judged against it (docs/parity.md). On a device the artifact
    runs there and is also compared with its own host run (device_vs_host); an emulator is
    slow, so give it a smaller budget (--prompts 2 --decode-steps 8 --greedy-tokens 8)."""
    from exporter.pipeline import verify as do_verify
    from exporter.records import to_json

    report = run(lambda: do_verify(folder, model=model, device=device, prompts=prompts, decode_steps=decode_steps,
                                   greedy_tokens=greedy_tokens, eval_set=eval_set, sessions=sessions,
                                   progress=StageProgress()))
    if json_:
        out_console.print_json(json.dumps(to_json(report)))
    else:
        render_parity(report)
    raise typer.Exit(0 if report.passed else 1)


def render_parity(report) -> None:
    from dataclasses import fields

    from exporter.reports import NoiseFloor

    compared = report.compared
    on = f" on {report.device_facts.label}" if report.device_vs_host is not None else ""
    table = Table(title=f"parity: {compared.artifact} on {compared.runtime}{on}")
    for col in ("check", "metric", "value"):
        table.add_column(col)
    sections = ("lowering", "quality", "greedy", "tokenizer") + (("device_vs_host",) if report.device_vs_host else ())
    for section in sections:
        metrics = getattr(report, section)
        for f in fields(metrics):
            value = getattr(metrics, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown = f"{value:.6g}" if isinstance(value, float) else str(value)
                interval = getattr(metrics, f"{f.name.removesuffix('_agreement')}_interval", None)
                if interval is not None:  # 95%, resampling whole prompts (stats.prompt_bootstrap)
                    shown += f" [{interval[0]:.4g}, {interval[1]:.4g}]"
                table.add_row(section, f.name, shown)
            elif isinstance(value, NoiseFloor):  # the reference against itself, slightly perturbed
                for metric in ("max_abs_diff", "cosine_min", "top1_agreement"):
                    table.add_row(section, f"noise floor {metric}", f"{getattr(value, metric):.6g}")
    if report.prefix is not None:  # the cached prompt prefix against the whole prompt
        prefix = report.prefix
        table.add_row("prefix", "prefix tokens", str(prefix.prefix_tokens))
        table.add_row("prefix", "prompts served from it", f"{prefix.served}/{prefix.prompts}")
        for name in ("max_abs_diff", "cosine_min", "top1_agreement", "positions"):
            value = getattr(prefix.metrics, name)
            table.add_row("prefix", name, f"{value:.6g}" if isinstance(value, float) else str(value))
    out_console.print(table)
    if report.task is not None:
        render_task(report.task)
    if report.passed:
        out_console.print("[bold green]PASS[/bold green]: every gate passed")
    for failure in report.failures:
        out_console.print(f"[bold red]FAIL[/bold red]: {escape(failure)}", highlight=False, soft_wrap=True)


def render_task(task) -> None:
    table = Table(title=f"task: {task.sessions} sessions of {task.eval_set}, k = {task.candidates} ({task.method})")
    for col in ("metric", "float model", "artifact"):
        table.add_column(col)
    table.add_row("top query = the float model's", "-", escape(str(task.agreement_top1)))
    table.add_row("float model's k queries also given", "-", f"{task.candidate_overlap:.1%}")
    for name, label in (("exact_at_1", "exact match @1"), ("hit_at_k", f"HitRate@{task.candidates}")):
        table.add_row(label, escape(str(getattr(task.float_model, name))), escape(str(getattr(task.artifact, name))))
    table.add_row(f"MRR@{task.candidates}", f"{task.float_model.mrr_at_k:.3f}", f"{task.artifact.mrr_at_k:.3f}")
    table.add_row("character ROUGE-L", f"{task.float_model.rouge_l_chars:.3f}", f"{task.artifact.rouge_l_chars:.3f}")
    out_console.print(table)
    if task.float_from_cache:
        out_console.print(f"float model's candidates for {task.float_from_cache} of {task.sessions} sessions: "
                          "from an earlier verify of this checkpoint (cache folder task-reference/)", highlight=False)


@app.command()
def bench(
    folder: ArtifactDir,
    json_: JsonFlag = False,
    runs: Annotated[int | None, typer.Option(help="Timed runs per case (default: the recipe's bench.runs).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up runs per case.")] = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    device: DeviceOpt = "host",
) -> None:
    """Measure prefill, TTFT, decode tok/s, load time and peak RSS; write DIR/bench.json.

    On an emulated device the figures are marked emulated: relative numbers only, nothing
    a phone would show."""
    from exporter.pipeline import bench as do_bench
    from exporter.records import to_json

    report = run(lambda: do_bench(folder, runs=runs, warmup=warmup, threads=threads, device=device,
                                  progress=StageProgress()))
    if json_:
        out_console.print_json(json.dumps(to_json(report)))
        return
    table = Table(title=f"bench: {report.artifact} on {report.device}, {report.runtime}, {report.threads} threads")
    for col in ("metric", "median", "min", "max", "runs"):
        table.add_column(col)

    def row(label: str, spread) -> None:
        table.add_row(label, f"{spread.median:.1f}", f"{spread.min:.1f}", f"{spread.max:.1f}", str(spread.runs))

    for case in report.prefill.values():
        row(f"prefill_tok_s @{case.prompt_tokens} tok", case.prefill_tok_s)
        row(f"ttft_ms @{case.prompt_tokens} tok", case.ttft_ms)
    row(f"decode_tok_s ({report.decode_tokens} tok)", report.decode_tok_s)
    prefix = report.prefix_ttft
    if prefix is not None:
        row(f"behaviour prompt tokens ({prefix.prefix_tokens} in the prefix)", prefix.prompt_tokens)
        row("ttft_ms, whole prompt", prefix.whole_ttft_ms)
        row("ttft_ms, cached prefix", prefix.cached_ttft_ms)
    out_console.print(table)
    if prefix is not None:
        out_console.print(f"cached prefix: TTFT x{prefix.ratio:.2f} of the whole prompt's (median of per-prompt "
                          f"ratios; the tokens left to prefill are x{prefix.suffix_share:.2f}); same first token "
                          f"on {prefix.same_first_token}/{prefix.whole_ttft_ms.runs} prompts; the prefix itself "
                          f"prefills once in {prefix.prefix_prefill_ms:.0f} ms")
    out_console.print(f"decode CPU {report.decode_cpu_s.median:.2f} s over {report.decode_wall_s.median:.2f} s wall "
                      f"(median run)")
    for sentence in report.unstable:
        out_console.print(f"[bold yellow]unstable[/bold yellow]: {escape(sentence)}; not a figure to compare: stop "
                          "other work on the machine, or rerun with more --runs", highlight=False, soft_wrap=True)
    out_console.print(f"load {report.load_ms:.0f} ms | peak RSS {report.peak_rss_mb:.0f} MB | "
                      f"artifact {report.artifact_mb:.1f} MB | "
                      f"~{report.bytes_per_decoded_token / 1e6:.1f} MB read per decoded token")


@app.command()
def generate(
    folder: ArtifactDir,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text.")] = None,
    behaviour: Annotated[list[str] | None, typer.Option(
        "--behaviour", "-b", help="One event of a session, ACTION:TEXT (search, click, cart, buy, favorite), "
                                  "repeated oldest first: prints the next query the artifact predicts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate (greedy) after --prompt.")] = 64,
) -> None:
    """Run the artifact greedily on a prompt and print the generated text; or, with --behaviour,
    build the behaviour prompt of the recipe's [task] format and print the predicted next query."""
    from exporter.pipeline import generate as do_generate

    out_console.print(run(lambda: do_generate(folder, prompt, behaviours=behaviour or (),
                                              max_new_tokens=max_new_tokens)), highlight=False, markup=False)


@app.command()
def inspect(folder: ArtifactDir, json_: JsonFlag = False) -> None:
    """Show an artifact's manifest: recipe, files, quantization summary, versions, timings."""
    from exporter.artifact import read_artifact
    from exporter.records import to_json

    m = run(lambda: read_artifact(folder)).manifest
    log = export_log(folder)
    if json_:
        out_console.print_json(json.dumps(to_json(m)))
        return
    opset = f" opset {m.target.info['opset']}" if "opset" in m.target.info else ""
    out_console.print(f"[bold]{m.name}[/bold]  target {m.target.name}{opset}  created {log.created if log else '-'}")
    out_console.print(f"model {m.model.source} ({m.model.architecture}, vocab {m.model.vocab_size}, "
                      f"max_seq_len {m.model.max_seq_len}, max_prefill_len {m.model.max_prefill_len})")
    files = Table(title="files")
    for col in ("file", "MB", "sha256"):
        files.add_column(col)
    for name, entry in m.files.items():
        files.add_row(name, f"{entry.bytes / 1e6:.2f}", entry.sha256[:16])
    out_console.print(files)
    quant = Table(title="quantization (first matching rule wins)")
    for col in ("rule", "kind", "scheme", "group", "symmetric", "matched"):
        quant.add_column(col)
    for r in m.quantization["rules"]:
        symmetric = "-" if r["scheme"] == "float" else ("yes" if r.get("symmetric", True) else "no")
        quant.add_row(r["match"], r["kind"], r["scheme"], str(r["group_size"] or "-"), symmetric, str(r["matched"]))
    out_console.print(quant)
    out_console.print(f"kept float: {len(m.quantization['float'])} modules "
                      f"({len(m.quantization['unmatched'])} matched no rule)")
    for entry in m.quantization.get("indivisible", []):  # manifests before 2026-12 have no such list
        how = (f"last group padded to {entry['groups_per_row']} x {entry['group_size']}" if entry["action"] == "pad"
               else "one group per row")
        out_console.print(f"width {entry['width']} not a multiple of group {entry['group_size']}: {entry['module']} "
                          f"({how})")
    if log is not None:  # an artifact copied without its export.json still inspects
        out_console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in log.timings_s.items()))
    out_console.print("versions: " + ", ".join(f"{k} {v}" for k, v in m.environment["packages"].items()))


def export_log(folder: Path):
    from exporter.manifest import EXPORT_LOG, ExportLog
    from exporter.records import RecordError, from_json

    try:
        return from_json(ExportLog, json.loads((folder / EXPORT_LOG).read_text(encoding="utf-8")))
    except (OSError, ValueError, RecordError):
        return None


class BuildLines:
    """The build's progress on stderr: one line per artifact and stage, and after each artifact
    a bar for the whole build. Picklable: `--jobs` workers print their own stage lines."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, artifact_id: str, message: str) -> None:
        err_console.print(f"[dim][{time.perf_counter() - self.t0:7.1f}s][/dim] [cyan]{escape(artifact_id)}[/cyan] "
                          f"{escape(message)}", highlight=False)

    def done(self, entry, finished: int, total: int) -> None:
        width = 30
        bar = "#" * round(width * finished / total) + "." * (width - round(width * finished / total))
        colour = {"passed": "green", "failed": "red"}.get(entry.result, "yellow")
        err_console.print(f"[dim][{time.perf_counter() - self.t0:7.1f}s][/dim] build {escape(f'[{bar}]')} "
                          f"{finished}/{total}  "
                          f"{escape(entry.id)} [{colour}]{entry.result}[/{colour}]", highlight=False)


@app.command()
def build(
    inputs: Annotated[list[str], typer.Argument(
        help="A matrix file (TOML, docs/ci.md); or one or more recipes with --model; or `merge SHARD_DIR ...` "
             "to join the shards of a CI matrix into --out.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The release folder: one folder per artifact, "
                                                         "index.json, report.html.")] = Path("dist"),
    model: ModelOpt = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="A LoRA adapter merged into --model.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field of every recipe "
                                                                 "(repeatable).")] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", "-d", help="Also verify on this device after the host (repeatable; see verify --device).")] = None,
    eval_set: Annotated[str | None, typer.Option("--eval", help="Add verify's task section on this eval set.")] = None,
    sessions: Annotated[int | None, typer.Option(help="Eval sessions scored.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Artifacts exported and verified at once (refused "
                                                           "when they would not fit in memory); benches run one "
                                                           "at a time.")] = 1,
    shard: Annotated[str | None, typer.Option(help="Build the i-th of n deterministic slices, as i/n "
                                                   "(a CI matrix job each; then `build merge`).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild artifacts that are up to date.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Rebuild one artifact of the folder given as INPUTS and "
                                                        "confirm its files match the published sha256.")] = False,
    artifact: Annotated[str | None, typer.Option(help="With --check: which artifact (default: the first).")] = None,
) -> None:
    """Build the release matrix: export, verify (host, then each device) and bench every artifact;
    write OUT/<artifact>/ with its reports, OUT/index.json and OUT/report.html. Exit 1 if a gate
    failed, 8 if a stage failed in any artifact (the others are still built and reported).

    Up-to-date artifacts (same model, resolved recipe, tool versions and checks) are kept; an
    interrupted build resumes where it stopped."""
    from exporter.errors import UsageError

    def go():
        if check:
            return _build_check(inputs, artifact)
        if inputs[0] == "merge":
            return _build_merge(inputs[1:], out)
        from exporter.build.matrix import command_line_matrix, plan_build, read_matrix
        from exporter.build.matrix import shard as take_shard
        from exporter.build.report import write_report
        from exporter.build.run import build as do_build

        first = Path(inputs[0])
        if len(inputs) == 1 and first.suffix == ".toml" and first.is_file() and _is_matrix(first):
            if model or adapter or set_ or device or eval_set or sessions:
                raise UsageError("--model, --adapter, --set, --device, --eval and --sessions go in the matrix file",
                                 hint="or pass recipes instead of a matrix file")
            plan = plan_build(read_matrix(first), str(first))
        else:
            plan = plan_build(command_line_matrix(inputs, model, str(adapter) if adapter else None, set_ or [],
                                                  device or [], eval_set, sessions), "command line")
        plan = take_shard(plan, shard)
        lines = BuildLines()
        err_console.print(f"build: {len(plan.artifacts)} artifacts into {out}"
                          f"{f' (shard {shard})' if shard else ''}", highlight=False)
        index = do_build(plan, out, jobs=jobs, force=force, shard=shard or "", stage_line=lines,
                         artifact_done=lines.done)
        write_report(out)
        return index

    result = run(go)
    if check or inputs[0] == "merge":
        raise typer.Exit(result)
    render_build(result, out)
    raise typer.Exit({"passed": 0, "failed": 1}.get(result.result, 8))


def _is_matrix(path: Path) -> bool:
    """A matrix file has [[models]]; a recipe has a name and no models."""
    import tomllib

    try:
        return "models" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def _build_merge(shards: list[str], out: Path) -> int:
    from exporter.build.merge import merge
    from exporter.build.report import write_report

    progress = StageProgress()
    index = merge([Path(s) for s in shards], out, progress)
    write_report(out)
    render_build(index, out)
    return {"passed": 0, "failed": 1}.get(index.result, 8)


def _build_check(inputs: list[str], artifact: str | None) -> int:
    from exporter.build.check import check as do_check
    from exporter.errors import UsageError

    if len(inputs) != 1:
        raise UsageError("build --check takes one release folder", hint="recgpt-export build --check dist/")
    result = do_check(Path(inputs[0]), artifact, StageProgress())
    if result.identical:
        out_console.print(f"[bold green]identical[/bold green]: {result.artifact} rebuilt, all {result.files} files "
                          "have the published sha256")
        return 0
    out_console.print(f"[bold red]differs[/bold red]: {result.artifact} rebuilt; {len(result.differing)} of "
                      f"{result.files} files differ: {', '.join(result.differing)}", highlight=False, soft_wrap=True)
    return 1


def render_build(index, out: Path) -> None:
    table = Table(title=f"build: {len(index.artifacts)} artifacts, {index.result}")
    table.add_column("artifact", overflow="fold")
    for col in ("result", "MB", "decode tok/s", "TTFT ms", "KL mean", "top-1", "failed"):
        table.add_column(col, overflow="fold")
    for e in index.artifacts:
        f = e.figures
        failed = e.error if e.error else "; ".join(g.name for g in e.gates if not g.passed)
        colour = {"passed": "green", "failed": "red"}.get(e.result, "yellow")
        table.add_row(escape(e.id), f"[{colour}]{e.result}[/{colour}]", f"{e.bytes / 1e6:.1f}",
                      *(f"{f[k]:.3g}" if k in f else "-" for k in ("decode_tok_s", "ttft_ms", "kl_mean", "top1")),
                      escape(failed))
    out_console.print(table)
    out_console.print(f"wrote {out / 'index.json'} and {out / 'report.html'}")
    for e in index.artifacts:
        for failure in e.failures:
            out_console.print(f"[bold red]FAIL[/bold red] {escape(e.id)}: {escape(failure)}", highlight=False,
                              soft_wrap=True)
        for note in e.notes:
            out_console.print(f"[yellow]note[/yellow] {escape(e.id)}: {escape(note)}", highlight=False, soft_wrap=True)
        if e.error:
            out_console.print(f"[bold yellow]ERROR[/bold yellow] {escape(e.id)} at {e.stage}: {escape(e.error)}",
                              highlight=False, soft_wrap=True)


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="A release folder written by `recgpt-export build`.")]) -> None:
    """Redraw FOLDER/report.html from FOLDER/index.json (one self-contained page)."""
    from exporter.build.report import write_report

    out_console.print(f"wrote {run(lambda: write_report(folder))}")


@recipes_app.command("list")
def recipes_list() -> None:
    """List the shipped recipes: per target and precision for any model (pass --model), and
    the demo model's, tuned and measured on it."""
    from exporter.recipe_io import RECIPES_DIR, list_recipe_files, load_recipe

    table = Table()
    table.add_column("recipe", no_wrap=True)
    for col in ("target", "model", "description"):
        table.add_column(col)
    recipes = [(path, run(lambda path=path: load_recipe(path))) for path in list_recipe_files()]
    for path, r in sorted(recipes, key=lambda item: (bool(item[1].model.source), str(item[0]))):
        table.add_row(str(path.relative_to(RECIPES_DIR).with_suffix("")), r.target.name,
                      r.model.source.removeprefix("builtin:") or "any", r.description)
    out_console.print(table)


@recipes_app.command("show")
def recipes_show(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field before showing.")] = None,
) -> None:
    """Show a recipe fully resolved (defaults filled in, overrides applied) as JSON."""
    from exporter.recipe_io import load_recipe, recipe_to_dict

    out_console.print_json(json.dumps(recipe_to_dict(run(lambda: load_recipe(recipe, set_ or [])))))


@device_app.command("setup")
def device_setup(
    kind: Annotated[str, typer.Argument(help=f"The device to build: arm64-emu, {SSH_SPEC} or adb:SERIAL.")],
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="Folder of device environments (default: $RECGPT_DEVICES_DIR, else "
                      "~/.cache/recgpt-export/devices); later commands read $RECGPT_DEVICES_DIR.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when it is up to date.")] = False,
    cpu: Annotated[str, typer.Option(help="arm64-emu: the qemu CPU model runs emulate (max, or a phone core "
                                          "such as cortex-a76: its features pick the kernels), optionally "
                                          "with qemu's feature switches (max,sme=off).")] = "max",
    runners: Annotated[Path | None, typer.Option(
        "--runners", help="adb: a folder of runners built for Android with the NDK, as <target>/<runner>.")] = None,
) -> None:
    """Build a device's environment once (minutes; from Debian packages and PyPI wheels, no hub)."""
    from exporter.devices import arm64_emu
    from exporter.errors import UsageError

    def go():
        if kind.startswith("ssh://"):
            from exporter.devices import ssh

            ssh.setup(kind, progress=StageProgress())
            return
        if kind.startswith("adb:"):
            from exporter.devices import adb

            adb.setup(kind, runners, progress=StageProgress())
            return
        if kind != arm64_emu.KIND:
            raise UsageError(f"no setup for device {kind!r}",
                             hint=f"set up {arm64_emu.KIND}, ssh://[user@]host[:port] or adb:SERIAL")
        root = directory / kind if directory else None
        arm64_emu.setup(root, progress=StageProgress(), force=force, cpu=cpu)

    run(go)


@device_app.command("list")
def device_list() -> None:
    """The devices verify and bench can use here, with arch, runners and runtime versions."""
    from exporter.devices import arm64_emu
    from exporter.devices.host import HostDevice

    table = Table()
    for col in ("device", "arch", "state", "runners"):
        table.add_column(col)
    host = HostDevice().describe()
    table.add_row("host", host.arch, f"ready; CPU features: {' '.join(host.features) or 'unknown'}", "in-process")
    state = arm64_emu.status()
    if state is None:
        table.add_row(arm64_emu.KIND, "aarch64", "not set up (recgpt-export device setup arm64-emu)", "-")
    else:
        runners = ", ".join(f"{t}: {r['runtime']}" for t, r in state["runners"].items())
        table.add_row(arm64_emu.KIND, "aarch64", f"ready, emulated CPU {state.get('cpu', 'max')} ({state['qemu']})",
                      runners)
    out_console.print(table)


@device_app.command("remove")
def device_remove(kind: Annotated[str, typer.Argument(help="The device to remove: arm64-emu.")]) -> None:
    """Delete a device's environment (what `device setup` built)."""
    from exporter.devices import arm64_emu
    from exporter.errors import UsageError

    def go():
        if kind != arm64_emu.KIND:
            raise UsageError(f"no device {kind!r} to remove", hint=f"the removable device is {arm64_emu.KIND}")
        removed = arm64_emu.remove()
        out_console.print(f"removed {kind}" if removed else f"{kind} was not set up")

    run(go)


@intent_app.command("generate")
def intent_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train.jsonl and eval.jsonl.")],
    seed: Annotated[int, typer.Option(help="The data seed: the same seed writes the same sessions.")] = 7,
    train: Annotated[int, typer.Option(help="Training sessions.")] = 2000,
    eval_: Annotated[int, typer.Option("--eval", help="Eval sessions (another stream: none shared).")] = 1000,
) -> None:
    """Write generated shop sessions (behaviours and the next query) as JSONL (docs/intent.md)."""
    from exporter.intent.sessions import split, write_jsonl

    def go():
        train_set, eval_set = split(seed, train=train, eval=eval_)
        out.mkdir(parents=True, exist_ok=True)
        for name, sessions in (("train.jsonl", train_set), ("eval.jsonl", eval_set)):
            out_console.print(f"wrote {write_jsonl(sessions, out / name)} ({len(sessions)} sessions)")

    run(go)


@intent_app.command("eval")
def intent_eval(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, .gguf or builtin:NAME.")],
    adapter: Annotated[Path | None, typer.Option(help="A LoRA adapter merged into --model.")] = None,
    eval_set: Annotated[str, typer.Option("--eval", help="An eval JSONL file, or builtin.")] = "builtin",
    sessions: Annotated[int, typer.Option(help="Sessions scored (the first N).")] = 200,
    json_: JsonFlag = False,
) -> None:
    """Exact match @1 and character ROUGE-L of a float checkpoint's greedy next query."""
    from exporter.intent.score import score_checkpoint

    def go():
        result = score_checkpoint(model, adapter=adapter, eval_set=eval_set, sessions=sessions,
                                  progress=StageProgress())
        if json_:
            out_console.print_json(json.dumps(result))
            return
        table = Table()
        for col in ("model", "sessions", "exact match @1 (95% interval)", "char ROUGE-L mean"):
            table.add_column(col)
        table.add_row(result["model"], str(result["sessions"]), result["exact_match"]["text"],
                      f"{result['rouge_l_chars_mean']:.3f}")
        out_console.print(table)

    run(go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
