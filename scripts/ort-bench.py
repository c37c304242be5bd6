#!/usr/bin/env python3
"""onnxruntime timing server for compiler/examples/bench_runtime.rs (issue #19).

onnxruntime is only a yardstick here, never a dependency of the agent. The
benchmark drives this process over stdin/stdout so that tract and onnxruntime
measurements alternate in one run on one machine:

  load NAME MODEL.onnx THREADS INPUTS_DIR [CONST=VALUE ...]  -> "ok" | "error: ..."
  time NAME RUNS                                              -> median ms over RUNS calls
  profile MODEL.onnx RUNS INPUTS_DIR [CONST=VALUE ...]        -> one line of JSON
  quit

`profile` (issue #19 point 2, compiler/examples/profile_ops.rs) runs a fresh
1-thread session with onnxruntime's profiler on, discards the first call, and
answers {"NODE": ["OP_AFTER_FUSION", total_ms], ...} summed over RUNS calls,
keyed by the ONNX node name onnxruntime kept (a fused node keeps the name of
the node it was fused into).

INPUTS_DIR holds one NAME.npy per model input; inputs without a file take a
CONST=VALUE (a folded scalar such as Silero's sr) in the input's own type.
Sessions run sequentially (ORT_SEQUENTIAL), all graph optimisations on.
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def options(threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def load(args, sessions):
    name, model, threads, inputs_dir, *consts = args
    sess = ort.InferenceSession(model, options(threads), providers=["CPUExecutionProvider"])
    feed = inputs(sess, inputs_dir, consts)
    sess.run(None, feed)
    sessions[name] = (sess, feed)


def profile(args):
    model, runs, inputs_dir, *consts = args
    so = options(1)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(inputs_dir, "ort-profile")
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    feed = inputs(sess, inputs_dir, consts)
    for _ in range(int(runs) + 1):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    runs_seen = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    cutoff = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    nodes = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e["ts"] < cutoff:
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        prev = nodes.get(node, [op, 0.0])
        nodes[node] = [op, prev[1] + e["dur"] / 1e3]
    return json.dumps(nodes)


def inputs(sess, inputs_dir, consts):
    consts = dict(c.split("=", 1) for c in consts)
    feed = {}
    for i in sess.get_inputs():
        p = os.path.join(inputs_dir, i.name + ".npy")
        if os.path.exists(p):
            feed[i.name] = np.load(p).astype(TYPES.get(i.type, np.float32))
        elif i.name in consts:
            feed[i.name] = np.array(float(consts[i.name])).astype(TYPES.get(i.type, np.float32))
        else:
            raise ValueError(f"no data for input {i.name} ({i.type}, {i.shape})")
    return feed


def main():
    sessions = {}
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "load":
                load(parts[1:], sessions)
                print("ok", flush=True)
            elif parts[0] == "time":
                sess, feed = sessions[parts[1]]
                ts = []
                for _ in range(int(parts[2])):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    ts.append((time.perf_counter() - t) * 1e3)
                ts.sort()
                print(f"{ts[len(ts) // 2]:.6f}", flush=True)
            elif parts[0] == "profile":
                print(profile(parts[1:]), flush=True)
            elif parts[0] == "quit":
                return
            else:
                print(f"error: unknown command {parts[0]}", flush=True)
        except Exception as e:  # reported to the benchmark, which stops
            print(f"error: {e}".replace("\n", " | "), flush=True)


if __name__ == "__main__":
    main()
