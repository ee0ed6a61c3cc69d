"""Property: random writes into random dtypes and shapes round-trip exactly
through a recorded trace, for `state` at every change and for `blame`.

Each example watches an array (small ones are compared byte for byte,
large ones are tracked by page), records a trace while it applies random
writes (single elements, slices, whole-array updates, writes that change
nothing), one write per run of one line, and keeps a copy of the array
after each write. Then, from the trace alone:

- the changes are exactly the writes that changed bytes, in order, each
  on the line that made it (the one line of `apply` that writes);
- the state at each change is the copy the program kept then, byte for
  byte (NaNs and signed zeros included);
- `blame` of a random element names the last write that changed it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed in this venv (tests/requirements.txt)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import memwatch  # noqa: E402

DTYPES = ["uint8", "int16", "int32", "int64", "float32", "float64", "complex64", "bool"]


@st.composite
def cases(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    big = draw(st.booleans())
    if big:
        # Larger than 16 KiB: tracked by page faults, not compared.
        shape = (draw(st.integers(5_000, 9_000)) // dtype.itemsize * 8,)
    else:
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    size = int(np.prod(shape))
    writes = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["element", "slice", "all", "same"]),
                st.integers(0, size - 1),
                st.integers(1, 64),
                st.integers(-(2**31), 2**31 - 1),
            ),
            min_size=1,
            max_size=12,
        )
    )
    return dtype, shape, writes


def value(dtype: np.dtype, seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed & 0xFFFFFFFF)
    raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    out = raw.view(dtype).copy()
    if dtype == np.bool_:
        out = (raw[:n] & 1) == 1
    return out


def apply(a: np.ndarray, kind: str, at: int, n: int, seed: int) -> None:
    flat = a.reshape(-1)
    if kind == "element":
        where, new = slice(at, at + 1), value(a.dtype, seed, 1)
    elif kind == "slice":
        end = min(at + n, flat.size)
        where, new = slice(at, end), value(a.dtype, seed, end - at)
    elif kind == "all":
        where, new = slice(None), value(a.dtype, seed, flat.size)
    else:
        where, new = slice(at, at + 1), flat[at : at + 1].copy()  # changes nothing
    flat[where] = new  # WRITES


WRITE_LINE = next(i for i, s in enumerate(Path(__file__).read_text().splitlines(), 1) if s.endswith("# WRITES"))


# No explain phase: it traces with sys.monitoring, whose tool id memwatch holds.
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(case=cases())
def test_random_writes_round_trip_through_state_and_blame(case, tmp_path_factory):
    dtype, shape, writes = case
    trace = tmp_path_factory.mktemp("prop") / "p.mwt"
    a = np.zeros(shape, dtype=dtype)
    memwatch.configure(live=False)
    memwatch.start(trace=trace)
    memwatch.watch(a, name="a")
    kept: list[tuple[int, bytes]] = []
    last_writer: dict[int, int] = {}  # flat element -> index in `kept`
    try:
        for kind, at, n, seed in writes:
            before = a.tobytes()
            apply(a, kind, at, n, seed)
            after = a.tobytes()
            if after != before:
                b0 = np.frombuffer(before, dtype=np.uint8).reshape(-1, dtype.itemsize)
                b1 = np.frombuffer(after, dtype=np.uint8).reshape(-1, dtype.itemsize)
                for e in np.nonzero((b0 != b1).any(axis=1))[0]:
                    last_writer[int(e)] = len(kept)
                kept.append((WRITE_LINE, after))
    finally:
        memwatch.unwatch(a)
        memwatch.stop()
    t = memwatch.open_trace(trace)
    changes = t.changes(tag="a")
    assert [c.line for c in changes] == [line for line, _ in kept]
    for c, (_, want) in zip(changes, kept):
        assert np.ascontiguousarray(t.state("a", at=c.seq)).tobytes() == want, c.seq
    for e, k in list(last_writer.items())[:5]:
        index = np.unravel_index(e, shape)
        blamed = t.blame("a", index=tuple(int(i) for i in index))
        assert blamed is not None and blamed.seq == changes[k].seq, (e, index)
