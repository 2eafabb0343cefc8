"""Calibration: the texts quantization learns from, and the activations they produce.

Smoothing, the block-scale search and end-to-end tuning all read calibration text: the
built-in behaviour-like lines (exporter/prompts.py) or a file of the user's own, never the
prompts ``verify`` scores. Tokenized once per use, run through our float (or smoothed)
decoder on a fixed number of threads so the activations' last bits, and so the exported
bytes, do not depend on the machine's core count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from exporter.errors import UsageError


def calibration_texts(spec, field: str = "quant.smoothing.calibration") -> list[str]:
    """The built-in calibration lines, or the non-blank lines of the user's UTF-8 file named
    by ``spec.calibration`` (``field``: where the recipe sets it, for the error line)."""
    if spec.calibration == "builtin":
        from exporter.prompts import CALIBRATION_TEXTS

        return list(CALIBRATION_TEXTS)
    path = Path(spec.calibration)
    if not path.is_file():
        raise UsageError(f"{field}: {path} is not a file",
                         hint='give a UTF-8 text file with one sample per line, or "builtin"')
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"{field}: {path} has no text", hint="put one sample per line")
    return lines


def calibration_samples(lm: nn.Module, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, cut to what one prefill of the decoder's cache holds;
    texts that encode to nothing are dropped. Tokenized once: these are what calibration
    runs and what the manifest counts."""
    samples = [tokenizer.encode(text, add_special_tokens=False)[: lm.max_seq_len - 1] for text in texts]
    return [ids for ids in samples if ids]


@contextlib.contextmanager
def fixed_threads(count: int):
    """torch on ``count`` threads inside the block, whatever the machine has: float sums then
    split the same way on every machine, so calibration and tuning give the same bits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def observe_linear_inputs(lm: nn.Module, samples: Sequence[Sequence[int]], names: Sequence[str],
                          record: Callable[[str, torch.Tensor], None]) -> None:
    """One prefill of each sample (token ids, from calibration_samples) through our decoder,
    passing the input of every Linear in ``names`` to ``record(name, x)``; the KV cache the
    calibration wrote is cleared afterwards.

    On one thread: the activations' last bits then do not depend on how the work was split,
    so verify, which rebuilds the reference from the recipe, calibrates to the same values
    as the export did (searched scales turn a last-bit difference into another scale where
    two candidates nearly tie: block_search.py)."""
    from exporter.runners import EagerRunner

    modules = dict(lm.named_modules())
    handles = []
    for name in names:
        if name == "lm_head":
            # The decoder runs the lm_head on a call's last position only; its input at every
            # position is the final norm of the last layer's output.
            handles.append(lm.model.layers[-1].register_forward_hook(
                lambda _m, _i, output: record("lm_head", lm.model.norm(output).detach())))
        else:
            handles.append(modules[name].register_forward_hook(
                lambda _m, inputs, _o, name=name: record(name, inputs[0].detach())))
    runner = EagerRunner(lm)
    try:
        with torch.no_grad(), fixed_threads(1):
            for ids in samples:
                runner.prefill(list(ids))
    finally:
        for handle in handles:
            handle.remove()
        lm.reset_caches()


def with_absolute_calibration(recipe):
    """Check the recipe's calibration files before any work, and record their absolute
    paths: verify rebuilds the reference from the manifest's recipe, maybe from another
    directory."""
    from dataclasses import replace

    quant = recipe.quant
    for table, used in (("smoothing", quant.smoothing.alpha > 0),
                        ("scale_search", quant.scale_search.method != "none"),
                        ("tuning", quant.tuning.steps > 0)):
        spec = getattr(quant, table)
        if used and spec.calibration != "builtin":
            calibration_texts(spec, f"quant.{table}.calibration")  # a missing or empty file fails here, in one line
            quant = replace(quant, **{table: replace(spec, calibration=str(Path(spec.calibration).resolve()))})
    return replace(recipe, quant=quant)
