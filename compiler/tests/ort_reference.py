"""Runs the ORIGINAL ONNX model under onnxruntime (the tests' independent reference).

usage: ort_reference.py MODEL IN_DIR OUT_DIR CONSTS_JSON
IN_DIR holds <input>.npy (float32); CONSTS_JSON maps scalar inputs to values (e.g. {"sr": 16000}).
Writes OUT_DIR/<index>.npy per model output, in model order.
"""
import json, os, sys

import numpy as np
import onnxruntime as ort

model, in_dir, out_dir, consts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
so = ort.SessionOptions()
so.intra_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
feed = {}
for i in sess.get_inputs():
    if i.name in consts:
        dtype = np.int64 if "int64" in i.type else np.float32
        feed[i.name] = np.array(consts[i.name], dtype=dtype)
    else:
        feed[i.name] = np.load(os.path.join(in_dir, i.name + ".npy"))
os.makedirs(out_dir, exist_ok=True)
for k, v in enumerate(sess.run(None, feed)):
    np.save(os.path.join(out_dir, f"{k}.npy"), np.ascontiguousarray(v, dtype=np.float32))
