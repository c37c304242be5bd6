#!/usr/bin/env python3
"""Bytes after zstd -19 of one weight stored as f16, as an int16 on the int8+residual
grid, and as two int8 planes (int8 + residual, the compiler's `Restore::Int8Residual`),
with each storage's max absolute error. docs/compiler.md ("Residual storage") quotes it.

    python3 -m pip install onnx numpy zstandard
    scripts/residual-sizes.py [MODEL.onnx] [WEIGHT] [LEVELS...]

Defaults: .cache/models/silero_vad_16k_sequence.onnx, onnx::LSTM_210, levels 15 7 3 1.
Channels are on axis 1 for LSTM weights ([1, 4H, I]), else axis 0, as in the compiler.
"""
import sys

import numpy as np
import onnx
import zstandard
from onnx import numpy_helper

model = sys.argv[1] if len(sys.argv) > 1 else ".cache/models/silero_vad_16k_sequence.onnx"
name = sys.argv[2] if len(sys.argv) > 2 else "onnx::LSTM_210"
levels = [int(x) for x in sys.argv[3:]] or [15, 7, 3, 1]

found = [t for t in onnx.load(model).graph.initializer if t.name == name]
if not found:
    sys.exit(f"{model}: no initializer named {name!r}")
w = numpy_helper.to_array(found[0]).astype(np.float32)
axis = 1 if w.ndim == 3 and w.shape[0] == 1 else 0
zst = zstandard.ZstdCompressor(level=19)


def z(b):
    return len(zst.compress(b))


def err(x):
    return float(np.abs(x - w).max())


others = tuple(i for i in range(w.ndim) if i != axis)
mx = np.abs(w).max(axis=others, keepdims=True)
s1 = np.where(mx > 0, mx / 127, 1).astype(np.float32)
q1 = np.round(w / s1).astype(np.int8)
print(f"{name} {list(w.shape)} from {model}")
print(f"  f32                 {z(w.tobytes()):>8} B")
print(f"  f16                 {z(w.astype(np.float16).tobytes()):>8} B  max err {err(w.astype(np.float16).astype(np.float32)):.2e}")
print(f"  int8                {z(q1.tobytes()):>8} B  max err {err(q1 * s1):.2e}")
for L in levels:
    s2 = s1 / (2 * L)
    q2 = np.clip(np.round((w - q1 * s1) / s2), -L, L).astype(np.int8)
    q16 = (q1.astype(np.int16) * (2 * L) + q2).astype(np.int16)
    print(
        f"  L={L:<3} int8 planes   {z(q1.tobytes() + q2.tobytes()):>8} B  max err {err(q1 * s1 + q2 * s2):.2e}"
        f"   int16 same grid {z(q16.tobytes()):>8} B"
    )
