#!/usr/bin/env python3
"""How much each weight's int8 storage moves a model's outputs (onnxruntime).

Usage: scripts/int8-sensitivity.py MODEL.onnx N,C,H,W [--single]

Quantizes Conv/ConvTranspose/Gemm/MatMul weights (>= 128 elements) the way
the compiler's int8-weights pass does (per output channel, symmetric,
s_c = max|w_c| / 127; also with an MSE-searched clipping range for
comparison), runs the original and the quantized graph on 6 synthetic text
pages (normalised like PP-OCR: det/cls ImageNet mean/std for H > 64, else
0.5/0.5), and prints max |diff|, mean cosine and mean |diff| against the
original. With --single it also quantizes one weight at a time (the measured
sensitivity the compiler's fallback would need) and then keeps the k most
sensitive in f32. Measurement only: nothing here is on the compile path.
Needs python3 with numpy, onnx and onnxruntime.
"""
import copy
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def load(path):
    m = onnx.load(path)
    keep = []
    for n in m.graph.node:  # Paddle exports keep weights in Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def page(h, w, seed):
    r = np.random.default_rng(seed)
    img = np.full((h, w), 235.0) + r.normal(0, 4, (h, w))
    y = 4
    while y < h - 8:
        lh = int(r.integers(6, 14))
        x = int(r.integers(2, 20))
        while x < w - 10:
            cw = int(r.integers(3, 9))
            for _ in range(3):
                a, b = int(r.integers(0, lh)), int(r.integers(0, cw))
                img[y + a:y + a + 2, x:x + cw] = 30
                img[y:y + lh, x + b:x + b + 2] = 30
            x += cw + int(r.integers(1, 4))
            if r.random() < 0.15:
                x += int(r.integers(6, 20))
        y += lh + int(r.integers(4, 16))
    return img


def inputs(shape, n=6):
    _, _, h, w = shape
    mean, std = ([0.5] * 3, [0.5] * 3) if h <= 64 else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    out = []
    for i in range(n):
        img = page(h, w, i)
        chans = [((img * t).clip(0, 255).round() / 255 - mean[k]) / std[k] for k, t in enumerate([1, 0.98, 0.95])]
        out.append(np.stack(chans)[None].astype(np.float32))
    return out


def quantize(w, axis, mse):
    wm = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    a = np.abs(wm).max(1, keepdims=True)
    if mse:
        best, besterr = a.copy(), np.full(a.shape, np.inf)
        for f in np.linspace(0.5, 1.0, 26):
            s = np.where(a > 0, a * f / 127, 1)
            e = ((np.clip(np.round(wm / s), -127, 127) * s - wm) ** 2).sum(1, keepdims=True)
            better = e < besterr
            besterr, best = np.where(better, e, besterr), np.where(better, a * f, best)
        a = best
    s = np.where(a > 0, a / 127, 1)
    d = np.clip(np.round(wm / s), -127, 127) * s
    return np.moveaxis(d.reshape(np.moveaxis(w, axis, 0).shape), 0, axis).astype(np.float32)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    m = load(sys.argv[1])
    shape = tuple(int(x) for x in sys.argv[2].split(","))
    xs = inputs(shape)
    iname = m.graph.input[0].name
    ops = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
            ops[n.input[1]] = n.op_type
    inits = {t.name: t for t in m.graph.initializer}
    names = [k for k in ops if k in inits and int(np.prod(inits[k].dims)) >= 128]

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [s.run(None, {iname: x})[0] for x in xs]

    ref = run(m)

    def quantized(mse=False, skip=()):
        mm = copy.deepcopy(m)
        for t in mm.graph.initializer:
            if t.name in names and t.name not in skip:
                axis = 1 if ops[t.name] in ("MatMul", "ConvTranspose") else 0
                t.CopyFrom(numpy_helper.from_array(quantize(numpy_helper.to_array(t), axis, mse), t.name))
        return mm

    def metrics(out):
        mx = max(float(np.abs(a - b).max()) for a, b in zip(out, ref))
        cos = np.mean([float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) for a, b in zip(out, ref)])
        mae = np.mean([float(np.abs(a - b).mean()) for a, b in zip(out, ref)])
        return f"max_abs {mx:.4f}  cosine {cos:.6f}  mean_abs {mae:.2e}"

    print(f"{sys.argv[1]}: {len(names)} weights, output {ref[0].shape}")
    print("all int8 (max-abs scale):", metrics(run(quantized())))
    print("all int8 (MSE clipping): ", metrics(run(quantized(mse=True))))
    if "--single" not in sys.argv:
        return
    sens = []
    for nm in names:
        out = run(quantized(skip=set(names) - {nm}))
        sens.append((max(float(np.abs(a - b).max()) for a, b in zip(out, ref)), nm))
    sens.sort(reverse=True)
    v = [s for s, _ in sens]
    print(f"one weight int8 at a time, max_abs: median {np.median(v):.4f}, min {min(v):.4f}, max {max(v):.4f}")
    print("most sensitive:", ", ".join(f"{n} {s:.3f}" for s, n in sens[:5]))
    for k in (1, 2, 4, 8, 16, len(names) // 2):
        print(f"keep the {k} most sensitive f32:", metrics(run(quantized(skip={n for _, n in sens[:k]}))))


if __name__ == "__main__":
    main()
