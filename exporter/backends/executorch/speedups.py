"""Make XNNPACK lowering of our decoder about twice as fast, with a byte-identical .pte.

Where ExecuTorch 1.5.1 spends the time lowering a decoder (profiled in docs/benchmarks.md):
- XNNPACK's preprocess runs 17 graph-retracing passes on every partition (a decoder has over a hundred);
  for a decoder (linear, rmsnorm, rope, silu, cat, view; no conv, pooling, batch norm,
  upsample or aten SDPA) only two of them change anything.
- ``run_decompositions`` is called three times; the third, with a table whose ops are no
  longer in the graph, re-traces the whole model and changes nothing.
- Five aten->edge passes are no-ops for our graphs but re-trace it each.
- Python's GC walks millions of long-lived fx/fake-tensor objects.
- XNNPACK's GroupBasedPartitioner builds, for every node, the set of all nodes downstream and
  all nodes upstream of it (n^2 entries; 1.1 GB for the int4-asym graph) and reads only the
  downstream half.

``fast_lowering()`` patches those spots for the duration of one lowering and undoes every
patch on exit. It depends on ExecuTorch internals, which is why executorch is pinned
exactly and tests/test_xnnpack_speedups.py checks, per architecture, that the .pte is
byte-identical with and without it. Re-run that test on any executorch upgrade.
"""

from __future__ import annotations

import contextlib
import gc

XNNPACK_PASSES_KEPT = ("XNNPACKRemoveCloneOpsTransform", "InsertPadQDQPass")
EDGE_PASSES_SKIPPED = ("NormalizeTransposePass", "ReplaceBrokenOpsWithFunctionalOpsPass",
                       "RemoveMixedTypeOperators", "LegalizePortableDimOrderPass", "SymToTensorPass")


@contextlib.contextmanager
def fast_lowering():
    import torch
    from executorch.backends.xnnpack import _passes as xnn_passes
    from executorch.exir.graph_module import contains_any_call_fn_target_op
    from torch.fx.passes.infra.pass_base import PassBase, PassResult

    undo = []

    original_init = xnn_passes.XNNPACKPassManager.__init__

    def init(self, exported_program, passes=None):
        original_init(self, exported_program, passes)
        if not passes:  # only the default list is trimmed; an explicit list is the caller's
            self.passes = [p for p in self.passes if p.__name__ in XNNPACK_PASSES_KEPT]

    xnn_passes.XNNPACKPassManager.__init__ = init
    undo.append(lambda: setattr(xnn_passes.XNNPACKPassManager, "__init__", original_init))

    # aten.sym_size & co. are keys of every table and never leave the graph: they don't count.
    sym_ops = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int,
               torch.ops.aten.sym_numel.default, torch.ops.aten.sym_storage_offset.default}
    original_decompose = torch.export.ExportedProgram.run_decompositions

    def run_decompositions(self, decomp_table=None, *args, **kwargs):
        if decomp_table and not contains_any_call_fn_target_op(
                self.graph_module, [op for op in decomp_table if op not in sym_ops]):
            return self  # nothing in the graph to decompose
        return original_decompose(self, decomp_table, *args, **kwargs)

    torch.export.ExportedProgram.run_decompositions = run_decompositions
    undo.append(lambda: setattr(torch.export.ExportedProgram, "run_decompositions", original_decompose))

    original_call = PassBase.__call__

    def call(self, graph_module):
        if type(self).__name__ in EDGE_PASSES_SKIPPED:
            return PassResult(graph_module, False)
        return original_call(self, graph_module)

    PassBase.__call__ = call
    undo.append(lambda: setattr(PassBase, "__call__", original_call))

    from executorch.exir.backend.canonical_partitioners import group_partitioner

    original_viewer = group_partitioner._DependencyViewer
    group_partitioner._DependencyViewer = DownstreamViewer
    undo.append(lambda: setattr(group_partitioner, "_DependencyViewer", original_viewer))

    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(200000, 50, 1000)

    def restore_gc():
        gc.set_threshold(*thresholds)
        gc.unfreeze()

    undo.append(restore_gc)
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


class DownstreamViewer:
    """The one question GroupBasedPartitioner asks its dependency viewer: which nodes lie
    downstream of a node (transitively). ExecuTorch's viewer also builds the upstream
    closure, which nothing reads: half of its n^2 set entries.

    Sets, as there: a bitmask per node saves memory but made the partitioning several times
    slower (docs/benchmarks.md), since the caller iterates the answer in Python."""

    def __init__(self, graph_module) -> None:
        self._downstream: dict = {}
        for node in reversed(graph_module.graph.nodes):  # every user comes later in the graph
            reach = set()
            for user in node.users:
                reach.add(user)
                reach |= self._downstream.get(user, set())
            self._downstream[node] = reach

    def downstreams_of(self, node) -> set:
        return self._downstream.get(node, set())
