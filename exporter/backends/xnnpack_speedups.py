"""Make XNNPACK lowering of our decoder about twice as fast, with a byte-identical .pte.

Where ExecuTorch 1.5.1 spends the time lowering SmolLM2-135M (profiled, docs/benchmarks.md):
- XNNPACK's preprocess runs 17 graph-retracing passes on every partition (123 for SmolLM2);
  for a decoder (linear, rmsnorm, rope, silu, cat, view; no conv, pooling, batch norm,
  upsample or aten SDPA) only two of them change anything.
- ``run_decompositions`` is called three times; the third, with a table whose ops are no
  longer in the graph, re-traces the whole model and changes nothing.
- Five aten->edge passes are no-ops for our graphs but re-trace it each.
- Python's GC walks millions of long-lived fx/fake-tensor objects.
- XNNPACK's GroupBasedPartitioner builds, for every node, the set of all nodes downstream and
  all nodes upstream of it (n^2 entries; 1.1 GB of the int4-asym export's peak) and reads
  only the downstream half.

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
    downstream of a node (transitively); it iterates the answer once, in ``any(...)``.

    ExecuTorch's viewer holds two Python sets per node, the downstream and the upstream
    closure (nothing reads the latter): n^2 set entries, 1.1 GB of the int4-asym export's
    peak. Here each node's downstream closure is one integer used as a bitmask over the
    graph's nodes, n^2 bits in all; ``downstreams_of`` yields the same nodes from it."""

    def __init__(self, graph_module) -> None:
        self._nodes = list(graph_module.graph.nodes)
        index = {node: i for i, node in enumerate(self._nodes)}
        self._mask: dict = {}
        for node in reversed(self._nodes):  # every user comes later in the graph
            mask = 0
            for user in node.users:
                mask |= (1 << index[user]) | self._mask.get(user, 0)
            self._mask[node] = mask
        self._bytes = (len(self._nodes) + 7) // 8

    def downstreams_of(self, node):
        import numpy as np

        mask = self._mask.get(node, 0)
        bits = np.unpackbits(np.frombuffer(mask.to_bytes(self._bytes, "little"), dtype=np.uint8), bitorder="little")
        return [self._nodes[i] for i in np.flatnonzero(bits)]
