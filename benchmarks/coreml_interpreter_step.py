"""Time the Core ML interpreter on a package: load, a 64-token prefill, 20 decode steps.

    .venv/bin/python benchmarks/coreml_interpreter_step.py out/coreml-fp16/model.mlpackage

Prints wall and CPU time (2 shared cores: a busy neighbour shows as cpu < wall). This times
our NumPy verifier, not Core ML on a device.
"""

import sys
import time

import numpy as np

from exporter.backends.coreml.interp import CoreMLProgram

t, c = time.perf_counter(), time.process_time()
program = CoreMLProgram(sys.argv[1])
print(f"load: wall {time.perf_counter() - t:.2f} s, cpu {time.process_time() - c:.2f} s")
state = program.new_state()
t, c = time.perf_counter(), time.process_time()
program.predict({"tokens": np.arange(100, 164, dtype=np.int32)[None], "input_pos": np.array([0], np.int32)}, state)
print(f"prefill 64 tokens: wall {time.perf_counter() - t:.3f} s, cpu {time.process_time() - c:.3f} s")
walls, cpus = [], []
for i in range(20):
    t, c = time.perf_counter(), time.process_time()
    program.predict({"tokens": np.array([[200 + i]], np.int32), "input_pos": np.array([64 + i], np.int32)}, state)
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
print(f"decode step (median of 20): wall {np.median(walls) * 1e3:.1f} ms (min {min(walls) * 1e3:.1f}, "
      f"max {max(walls) * 1e3:.1f}), cpu {np.median(cpus) * 1e3:.1f} ms")
