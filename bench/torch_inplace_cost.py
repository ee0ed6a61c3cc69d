"""What ``memwatch.explain_inplace()`` costs a PyTorch program (CPU).

    .venv-3.12/bin/python bench/torch_inplace_cost.py [--repeat 7] [--n 2000]

Each workload runs with explain_inplace off and on, alternately, REPEAT
times; the figures are medians. Workloads:

- ``ops``: a loop of small out-of-place ops (``x * w``, ``+ 1``, ``relu``
  on 16 floats, no autograd): the dispatch mode's cost per op that writes
  nothing;
- ``inplace``: the same ops in place (``mul_``, ``add_``, ``relu_``): the
  cost per logged write;
- ``train-small``: forward and backward of a 4-layer MLP of width 64 on a
  batch of 8 (autograd nodes, so the node-creation hook too);
- ``train-256``: the same with width 256 and a batch of 256, where the ops
  themselves take longer.

Checks, first, that the explanation is there: a note naming the line of a
``mul_`` on a saved tensor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import memwatch

torch.set_num_threads(1)


def ops(n: int) -> float:
    x, w = torch.randn(16), torch.randn(16)
    t = time.perf_counter()
    for _ in range(n):
        y = x * w
        y = y + 1
        y = y.relu()
    return (time.perf_counter() - t) / (3 * n)


def inplace(n: int) -> float:
    y, w = torch.randn(16), torch.randn(16)
    t = time.perf_counter()
    for _ in range(n):
        y.mul_(w)
        y.add_(1)
        y.relu_()
    return (time.perf_counter() - t) / (3 * n)


def train(width: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(4)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width)
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return (time.perf_counter() - t) / steps


def check() -> None:
    x = torch.randn(3, requires_grad=True)
    y = x.sigmoid()
    y.mul_(2)
    line = check.__code__.co_firstlineno + 3
    try:
        y.sum().backward()
    except RuntimeError as e:
        notes = getattr(e, "__notes__", [])
        assert any(f"torch_inplace_cost.py:{line} in check()" in n and "aten::mul_.Tensor" in n for n in notes), notes
    else:
        raise AssertionError("no error")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--n", type=int, default=2000, help="loop iterations of the op workloads")
    a = p.parse_args()
    with memwatch.explain_inplace():
        check()
    work = {
        "ops": (lambda: ops(a.n), "per op"),
        "inplace": (lambda: inplace(a.n), "per op"),
        "train-small": (lambda: train(64, 8, a.n // 20), "per step"),
        "train-256": (lambda: train(256, 256, a.n // 100), "per step"),
    }
    print(f"torch {torch.__version__}, 1 thread, medians of {a.repeat}")
    print(f"{'workload':<12} {'off':>10} {'on':>10} {'ratio':>7}")
    for name, (fn, unit) in work.items():
        fn()  # warm up (first calls allocate, build caches)
        with memwatch.explain_inplace():
            fn()
        off, on, ratios = [], [], []
        for _ in range(a.repeat):
            t_off = fn()
            with memwatch.explain_inplace():
                t_on = fn()
            off.append(t_off)
            on.append(t_on)
            ratios.append(t_on / t_off)
        print(
            f"{name:<12} {statistics.median(off) * 1e6:>8.2f}us {statistics.median(on) * 1e6:>8.2f}us "
            f"{statistics.median(ratios):>6.2f}x  ({unit})"
        )


if __name__ == "__main__":
    main()
