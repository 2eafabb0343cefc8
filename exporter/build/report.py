"""report.html: one self-contained page of a build (no network, no script at view time).

A table of every artifact (size, each gate passed or failed in colour, decode / prefill /
TTFT) and matplotlib plots inlined as SVG: KL per decode step and its distribution per
artifact, top-1 agreement per decode step, task agreement with its interval, throughput per
target and device, size against quality. It is drawn from index.json and the parity.json /
bench.json files beside it, so `recgpt-export report DIR` redraws it at any time.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from exporter.build.index import ERROR, FAILED, INDEX_FILE, PASSED, ArtifactEntry, BuildIndex, read_index
from exporter.errors import require
from exporter.records import write_text_atomic

REPORT_FILE = "report.html"
COLOURS = {PASSED: "#1a7f37", FAILED: "#cf222e", ERROR: "#9a6700"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th { background: #f6f8fa; } td.id, td.gates { text-align: left; }
.passed { color: #1a7f37; font-weight: 600; } .failed { color: #cf222e; font-weight: 600; }
.error { color: #9a6700; font-weight: 600; } .gate-fail { color: #cf222e; } .gate-pass { color: #1a7f37; }
figure { display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 13px; color: #59636e; max-width: 560px; }
"""


def write_report(dist: Path) -> Path:
    """Draw dist/report.html from dist/index.json; returns its path."""
    dist = Path(dist)
    index = read_index(dist)
    write_text_atomic(dist / REPORT_FILE, render(index, dist))
    return dist / REPORT_FILE


def render(index: BuildIndex, dist: Path) -> str:
    parity = {e.id: _read(dist / e.id / "parity.json") for e in index.artifacts}
    plots = _plots(index, parity)
    counts = {r: sum(e.result == r for e in index.artifacts) for r in (PASSED, FAILED, ERROR)}
    summary = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>recgpt-export build: {html.escape(index.result)}</title><style>{STYLE}</style></head><body>",
        f'<h1>Build <span class="{index.result}">{html.escape(index.result)}</span></h1>',
        f"<p>{len(index.artifacts)} artifacts ({summary}) from {html.escape(index.matrix)}"
        f"{' shard ' + html.escape(index.shard) if index.shard else ''}; every figure is in "
        f"{INDEX_FILE} and each artifact's parity.json and bench.json.</p>",
        _table(index.artifacts),
        "<h2>Plots</h2>",
        *(f'<figure id="plot-{name}">{svg}<figcaption>{html.escape(caption)}</figcaption></figure>'
          for name, (svg, caption) in plots.items()),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _table(entries: tuple[ArtifactEntry, ...]) -> str:
    head = ("artifact", "target", "result", "MB", "gates", "decode tok/s", "prefill tok/s", "TTFT ms",
            "KL mean", "top-1", "task agreement")
    rows = ['<table id="artifacts"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for e in entries:
        f = e.figures
        gates = " ".join(f'<span class="gate-{"pass" if g.passed else "fail"}" title="{html.escape(g.report)}: '
                         f'{g.value:.4g} vs {g.limit:.4g}">{"✔" if g.passed else "✘"} {html.escape(g.name)}</span>'
                         for g in e.gates if g.report == "parity.json")
        if e.result == ERROR:
            gates = f'<span class="error">{html.escape(e.stage)}: {html.escape(e.error)}</span> ' + gates
        cells = [f'<td class="id">{html.escape(e.id)}</td>', f"<td>{html.escape(e.target)}</td>",
                 f'<td class="{e.result}">{e.result}</td>', f"<td>{e.bytes / 1e6:.1f}</td>",
                 f'<td class="gates">{gates}</td>',
                 *(f"<td>{_number(f.get(key))}</td>" for key in ("decode_tok_s", "prefill_tok_s", "ttft_ms",
                                                                  "kl_mean", "top1", "task_agreement"))]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _plots(index: BuildIndex, parity: dict[str, dict | None]) -> dict[str, tuple[str, str]]:
    """name -> (inline SVG, caption): each plot drawn only when some artifact has its data."""
    matplotlib = require("matplotlib", "report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed ids and no date in the SVG: the same build draws the same page.
    plt.rcParams.update({"svg.hashsalt": "recgpt-export", "svg.fonttype": "none", "font.size": 9})
    quality = {i: p["quality"] for i, p in parity.items() if p is not None}
    plots: dict[str, tuple[str, str]] = {}

    def draw(name: str, caption: str, paint) -> None:
        figure, axes = plt.subplots(figsize=(6.4, 3.6))
        paint(axes)
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
        plt.close(figure)
        svg = buffer.getvalue()
        plots[name] = (svg[svg.index("<svg"):], caption)

    by_step = {i: q for i, q in quality.items() if q.get("kl_by_step")}
    if by_step:
        def kl_steps(ax):
            for artifact_id, q in by_step.items():
                ax.plot(range(len(q["kl_by_step"])), q["kl_by_step"], marker=".", label=artifact_id)
            ax.set(xlabel="teacher-forced decode step", ylabel="mean KL(float || artifact)", yscale="log")
            ax.legend(fontsize=7)
        draw("kl-per-step", "KL divergence from the float model per decode step, mean over the parity prompts.",
             kl_steps)

        def top1_steps(ax):
            for artifact_id, q in by_step.items():
                ax.plot(range(len(q["top1_by_step"])), q["top1_by_step"], marker=".", label=artifact_id)
            ax.set(xlabel="teacher-forced decode step", ylabel="top-1 agreement with the float model", ylim=(0, 1.02))
            ax.legend(fontsize=7)
        draw("top1-per-step", "Top-1 agreement with the float model per decode step, over the parity prompts.",
             top1_steps)
    spread = {i: q["kl_by_position"] for i, q in quality.items() if q.get("kl_by_position")}
    if spread:
        def kl_box(ax):
            floor = 1e-9  # a float artifact has KL 0 at some positions; a log axis needs > 0
            ax.boxplot([[max(v, floor) for v in values] for values in spread.values()], vert=False)
            ax.set_yticks(range(1, len(spread) + 1), list(spread), fontsize=7)
            ax.set(xscale="log", xlabel="KL(float || artifact) per position")
        draw("kl-distribution", "KL per position scored: its distribution per artifact (box: quartiles).", kl_box)
    tasks = {i: p["task"]["agreement_top1"] for i, p in parity.items() if p is not None and p.get("task")}
    if tasks:
        def task_bars(ax):
            ids = list(tasks)
            values = [t["hits"] / t["n"] if t["n"] else 0 for t in tasks.values()]
            low = [v - t["low"] for v, t in zip(values, tasks.values(), strict=True)]
            high = [t["high"] - v for v, t in zip(values, tasks.values(), strict=True)]
            ax.barh(ids, values, xerr=[low, high], color="#0969da")
            ax.set(xlim=(0, 1), xlabel="top query = the float model's (Wilson 95% interval)")
            ax.tick_params(axis="y", labelsize=7)
        draw("task-agreement", "Task agreement: share of eval sessions where the artifact's top next query is "
             "the float model's.", task_bars)
    speed = [e for e in index.artifacts if "decode_tok_s" in e.figures]
    if speed:
        def throughput(ax):
            ids = [f"{e.id} ({e.target})" for e in speed]
            y = range(len(ids))
            ax.barh([v - 0.2 for v in y], [e.figures["decode_tok_s"] for e in speed], height=0.4, label="decode")
            ax.barh([v + 0.2 for v in y], [e.figures["prefill_tok_s"] for e in speed], height=0.4, label="prefill")
            ax.set_yticks(list(y), ids, fontsize=7)
            ax.set(xlabel="tokens per second on the host (median run)")
            ax.legend(fontsize=7)
        draw("throughput", "Throughput per artifact, target and device: decode and prefill tokens per second.",
             throughput)
    sized = [e for e in index.artifacts if "kl_mean" in e.figures and e.bytes]
    if sized:
        def size_quality(ax):
            for e in sized:
                ax.scatter(e.bytes / 1e6, max(e.figures["kl_mean"], 1e-9), color=COLOURS[e.result])
                ax.annotate(e.id, (e.bytes / 1e6, max(e.figures["kl_mean"], 1e-9)), fontsize=6)
            ax.set(xlabel="artifact size (MB)", ylabel="mean KL from the float model", yscale="log")
        draw("size-quality", "Size against quality: each artifact's bytes and its mean KL (colour: its result).",
             size_quality)
    return plots
