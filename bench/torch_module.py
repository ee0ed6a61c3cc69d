"""What `memwatch.watch_module` costs on a PyTorch training loop: a
~1M-parameter MLP (784-1024-256-10, 1,068,810 parameters) trained on the
CPU with SGD and momentum, watched (every parameter, and the optimizer's
momentum with `--optimizer`) against the same loop unwatched, alternating
the two in one process (medians).

    python bench/torch_module.py [--steps 20] [--repeat 7] [--batch 128] [--optimizer] [--history]

Target (issue #17.6): the watched loop at most 1.3x the unwatched one. The
live report and the history are off by default (`configure(live=False,
max_history=0)`): what is measured is catching and diffing the changes;
`--history` keeps the default history too. Beside the ratio it prints
what a step writes (bytes of parameters) and how many changes it made,
and checks that every step changed every parameter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import memwatch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--optimizer", action="store_true", help="also watch_optimizer (the momentum buffers)")
    ap.add_argument("--history", action="store_true", help="keep the default history")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 784)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    memwatch.configure(live=False, max_history=100_000 if args.history else 0)
    counted: list[int] = []
    memwatch.on_change(lambda c: counted.append(1))

    def steps() -> None:
        for _ in range(args.steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    def run(watched: bool) -> float:
        if watched:
            memwatch.watch_module(model, name="model")
            if args.optimizer:
                memwatch.watch_optimizer(opt, name="opt")
        steps()  # warm: one step to fault in, state created
        counted.clear()
        t = time.perf_counter()
        steps()
        dt = time.perf_counter() - t
        if watched:
            memwatch.check()
            memwatch.unwatch(model)
            if args.optimizer:
                memwatch.unwatch(opt)
            want = len(list(model.parameters())) * (2 if args.optimizer else 1) * args.steps
            if len(counted) < want:
                sys.exit(f"error: {len(counted)} changes in {args.steps} steps, expected at least {want}")
        return dt

    steps()
    plain, watched = [], []
    for _ in range(args.repeat):
        plain.append(run(False))
        watched.append(run(True))
    b, w = statistics.median(plain), statistics.median(watched)
    v = sys.version_info
    print(
        f"CPython {v.major}.{v.minor}.{v.micro}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"MLP of {params:,} parameters ({params * 4 / 2**20:.1f} MB), batch {args.batch}, "
        f"{args.steps} steps, median of {args.repeat}"
    )
    what = "watch_module + watch_optimizer" if args.optimizer else "watch_module"
    print(f"  unwatched          {b / args.steps * 1e3:8.2f} ms/step")
    print(f"  {what:<18} {w / args.steps * 1e3:8.2f} ms/step")
    print(f"  ratio {w / b:5.2f}x (target <= 1.3x); each run's ratio: {', '.join(f'{a / p:.2f}' for a, p in zip(watched, plain))}")


if __name__ == "__main__":
    main()
