"""The ONNX Runtime device runner: the line protocol of et_runner.cpp over an ONNX artifact.

It runs on the device with a bare Python 3 and the ``site-packages/`` folder beside it (the
pinned onnxruntime and numpy wheels for the device's platform, unpacked by `device setup`),
so it imports nothing of this tool. The C API would let a C++ runner do the same, but no
package registry reachable here ships onnxruntime's C header; the Python wheel's kernels are
the same MLAS build an app's libonnxruntime.so runs.

  argv: ort_runner.py MODEL.onnx [THREADS]   (manifest.json of the artifact beside the model)
  out:  READY <vocab> <threads> <hwcap> <hwcap2>
  in:   STEP <start_pos> <n> <t1> ... <tn>    the last token's logits
  out:  LOGITS <vocab>\\n<vocab x float32 little-endian>
  in:   GREEDY <max_new> <n> <t1> ... <tn>    prefill + greedy decode, timed here
  out:  GREEDY <first_token_us> <decode_us> <generated> <t1> ... <tk>
  in:   QUIT
Errors go to stderr as one line starting "E ", then the process exits 1.
"""

import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "site-packages"))

AT_HWCAP, AT_HWCAP2 = 16, 26


def fail(message):
    sys.stderr.write("E " + message + "\n")
    sys.stderr.flush()
    sys.exit(1)


def hwcaps():
    """The CPU features the kernels see (getauxval), as et_runner reports them."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        return getauxval(AT_HWCAP), getauxval(AT_HWCAP2)
    except (OSError, AttributeError):
        return 0, 0


class Runner:
    def __init__(self, model, threads):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        manifest_path = os.path.join(os.path.dirname(os.path.abspath(model)), "manifest.json")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                cache = json.load(f)["io_signature"]["kv_cache"]
        except (OSError, KeyError, ValueError) as e:
            fail(f"cannot read the artifact's manifest.json beside {model}: {e}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads > 0:
            options.intra_op_num_threads = threads
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - the runtime's own message is the one line to show
            fail(f"onnxruntime cannot load {model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits")
        self.cache = []
        for i in range(cache["layers"]):
            for kind in ("key", "value"):
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(
                    (cache["batch"], cache["kv_heads"], cache["max_seq_len"], cache["head_dim"]),
                    dtype=cache.get("dtype", "float32")))
                self.cache.append(buffer)  # bound as past and present: the graph updates it in place
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
        self.max_seq_len = cache["max_seq_len"]

    def step(self, tokens, start_pos):
        np = self.np
        if start_pos + len(tokens) > self.max_seq_len:
            fail(f"positions {start_pos}..{start_pos + len(tokens) - 1} exceed the cache ({self.max_seq_len})")
        self.binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, start_pos + len(tokens)), dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0, -1]


def read_request(words, name):
    try:
        first, count = int(words[1]), int(words[2])
        tokens = [int(t) for t in words[3:3 + count]]
    except (IndexError, ValueError):
        fail(f"{name} needs two numbers and a token list")
    if count < 1 or len(tokens) != count or first < 0:
        fail(f"{name} needs a token count >= 1 and that many tokens")
    return first, tokens


def main():
    if len(sys.argv) < 2:
        print("usage: ort_runner.py MODEL.onnx [THREADS]")
        return 2
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    runner = Runner(sys.argv[1], threads)
    out = sys.stdout.buffer
    hwcap, hwcap2 = hwcaps()
    out.write(f"READY {runner.vocab} {runner.threads} {hwcap} {hwcap2}\n".encode())
    out.flush()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "QUIT":
            return 0
        if words[0] == "STEP":
            start_pos, tokens = read_request(words, "STEP")
            logits = runner.step(tokens, start_pos)
            out.write(f"LOGITS {runner.vocab}\n".encode() + logits.astype("<f4").tobytes())
        elif words[0] == "GREEDY":
            max_new, tokens = read_request(words, "GREEDY")
            if max_new < 1:
                fail("GREEDY needs a budget >= 1")
            if len(tokens) + max_new > runner.max_seq_len:
                fail(f"{len(tokens)} prompt tokens + {max_new} new exceed the cache ({runner.max_seq_len})")
            t0 = time.perf_counter()
            generated = [int(runner.step(tokens, 0).argmax())]
            first = time.perf_counter()
            position = len(tokens)
            while len(generated) < max_new:
                generated.append(int(runner.step([generated[-1]], position).argmax()))
                position += 1
            end = time.perf_counter()
            us = lambda a, b: int((b - a) * 1e6)  # noqa: E731
            out.write((f"GREEDY {us(t0, first)} {us(first, end)} {len(generated) - 1} "
                       + " ".join(map(str, generated)) + "\n").encode())
        else:
            fail(f"unknown request {words[0]!r}")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
