"""A small numpy training loop to run under memwatch.

A 2-layer MLP (tanh hidden layer) learns a synthetic regression task with
plain gradient descent. It watches its first layer's weights and a step
counter; everything else runs as usual.

    memwatch record python samples/train.py      # writes train.mwt
    memwatch query train.mwt --tag layer1_weight
"""

import sys

import numpy as np

import memwatch

rng = np.random.default_rng(0)
X = rng.normal(size=(256, 8)).astype(np.float32)
true_w = rng.normal(size=(8, 1)).astype(np.float32)
y = np.tanh(X @ true_w) + 0.05 * rng.normal(size=(256, 1)).astype(np.float32)

w1 = (0.3 * rng.normal(size=(8, 16))).astype(np.float32)
b1 = np.zeros(16, dtype=np.float32)
w2 = (0.3 * rng.normal(size=(16, 1))).astype(np.float32)
step = np.zeros(1, dtype=np.int64)

memwatch.watch(w1, name="layer1_weight")
memwatch.watch(step, name="step")

lr = np.float32(0.05)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
for i in range(steps):
    h = np.tanh(X @ w1 + b1)
    pred = h @ w2
    err = pred - y
    loss = float((err**2).mean())
    grad_pred = 2 * err / len(X)
    grad_w2 = h.T @ grad_pred
    grad_h = grad_pred @ w2.T * (1 - h**2)
    grad_w1 = X.T @ grad_h
    grad_b1 = grad_h.sum(axis=0)
    w1 -= lr * grad_w1
    b1 -= lr * grad_b1
    w2 -= lr * grad_w2
    step += 1
    if i == steps // 2:
        np.save("train_w1_mid.npy", w1)  # what `memwatch state --at` should rebuild
    if i % 10 == 0:
        print(f"step {i:3d}  loss {loss:.4f}")

np.save("train_w1_final.npy", w1)
print(f"final loss {loss:.4f}")
