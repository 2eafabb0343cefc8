"""[target.executorch]: the options of the executorch target."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ExecuTorchOptions:
    # q/k/v and gate/up as one Linear each where they share a rule: shorter decode steps, a
    # slower prefill (docs/targets/executorch.md). false keeps them apart, for apps whose
    # latency is mostly prefill.
    fuse_projections: bool = True
