"""watch(t, via="dispatch"): every torch op that writes a watched tensor (or a
view of it) is a change, with the op, the Python line and the values, on any
device. Runs on CPU tensors always, on CUDA where torch has a device."""

from __future__ import annotations

import json
import threading
import warnings
import weakref

import pytest

torch = pytest.importorskip("torch")

import memwatch  # noqa: E402
from memwatch import _display, _torch_dispatch  # noqa: E402
from conftest import here  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device here (torch.cuda.is_available() is False)"
        ),
    ),
]


@pytest.fixture(scope="module", autouse=True)
def dynamo_imported():
    """torch's dispatch modes import torch._dynamo at their first op (about
    2 s, once per process): done here, not in whichever test runs first."""
    import torch._dynamo  # noqa: F401


@pytest.fixture(autouse=True)
def mode_left():
    """Every test ends with no dispatch watch and memwatch's mode off this thread."""
    yield
    for region, *_ in memwatch._memwatch._regions():
        memwatch._memwatch._unwatch(region)
    assert _torch_dispatch._entries == {}
    assert not _torch_dispatch.entered()


def rows(changes):
    return [(c.tag, c.op, c.line, c.indices, c.old_values, c.new_values) for c in changes]


@pytest.mark.parametrize("device", DEVICES)
def test_each_in_place_op_is_a_change_with_its_op_line_and_values(changes, device):
    t = torch.zeros(4, device=device)
    memwatch.watch(t, name="t", via="dispatch")
    t.add_(1); l1 = here()  # noqa: E702
    t.mul_(2); l2 = here()  # noqa: E702
    t[1] = 5; l3 = here()  # noqa: E702
    t.zero_(); l4 = here()  # noqa: E702
    t += 0; l5 = here()  # noqa: E702 - an op that writes the same values back: no change
    assert rows(changes) == [
        ("t", "aten::add_.Tensor", l1, [0, 1, 2, 3], [0.0] * 4, [1.0] * 4),
        ("t", "aten::mul_.Tensor", l2, [0, 1, 2, 3], [1.0] * 4, [2.0] * 4),
        ("t", "aten::fill_.Scalar", l3, [1], [2.0], [5.0]),
        ("t", "aten::zero_", l4, [0, 1, 2, 3], [2.0, 5.0, 2.0, 2.0], [0.0] * 4),
    ]
    assert l5 not in [c.line for c in changes]
    c = changes[0]
    assert (c.variable, c.dtype, c.file) == ("t", "<f4", __file__)
    # The line is the caller's: memwatch's handler and torch's frames are not in the stack.
    assert not any("memwatch" in f or "/torch/" in f for f, _, _ in c.stack), c.stack
    assert "Op: aten::add_.Tensor\n" in c.report()
    assert "op=aten::add_.Tensor" in repr(c)
    table = _display.text_table(memwatch.history("t")).splitlines()
    assert table[0].split() == ["seq", "line", "function", "tag", "op", "change", "thread"]
    assert "aten::mul_.Tensor" in table[3]


@pytest.mark.parametrize("device", DEVICES)
def test_views_ops_that_only_read_and_out_arguments(changes, device):
    t = torch.zeros(4, device=device)
    memwatch.watch(t, name="t", via="dispatch")
    t[2:].fill_(3); l1 = here()  # noqa: E702 - a view's op writes t
    torch.add(torch.ones(4, device=device), 1.5, out=t); l2 = here()  # noqa: E702
    u = t * 2 + t.sum()  # reads t: nothing
    torch.mul(t, 2, out=u)  # writes another tensor from t: nothing
    t.clone().add_(1)  # a copy's op: nothing
    assert rows(changes) == [
        ("t", "aten::fill_.Scalar", l1, [2, 3], [0.0, 0.0], [3.0, 3.0]),
        ("t", "aten::add.out", l2, [0, 1, 2, 3], [0.0, 0.0, 3.0, 3.0], [2.5] * 4),
    ]
    changes.clear()
    # A watched view: writes to its base are its changes where they overlap it.
    base = torch.zeros(6, device=device)
    v = base[1:3]
    memwatch.watch(v, name="v", via="dispatch")
    base.add_(1); l1 = here()  # noqa: E702
    base[4] = 9  # beside v: nothing
    v[0] = 7; l2 = here()  # noqa: E702
    assert rows(changes) == [
        ("v", "aten::add_.Tensor", l1, [0, 1], [0.0, 0.0], [1.0, 1.0]),
        ("v", "aten::fill_.Scalar", l2, [0], [1.0], [7.0]),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_an_optimizer_step_is_the_line_that_called_it(changes, device):
    p = torch.nn.Parameter(torch.ones(4, device=device))
    memwatch.watch(p, name="param", via="dispatch")
    opt = torch.optim.SGD([p], lr=0.5)
    loss = (p * torch.full((4,), 2.0, device=device)).sum()
    loss.backward()  # computes p.grad, writes nothing of p
    assert changes == []
    opt.step(); line = here()  # noqa: E702
    # SGD updates CPU parameters one by one (add_), CUDA ones together (_foreach_add_).
    op = {"cpu": "aten::add_.Tensor", "cuda": "aten::_foreach_add_.List"}[device]
    assert [(c.tag, c.variable, c.op, c.line, c.old_values, c.new_values) for c in changes] == [
        ("param", "p", op, line, [1.0] * 4, [0.0] * 4)
    ]
    assert changes[0].stack[0][0] == __file__
    changes.clear()
    # Through .data too: an alias of the same memory.
    p.data.add_(3); l1 = here()  # noqa: E702
    p.data[0] = 4; l2 = here()  # noqa: E702
    assert [(c.op, c.line, c.new_values) for c in changes] == [
        ("aten::add_.Tensor", l1, [3.0] * 4),
        ("aten::fill_.Scalar", l2, [4.0]),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_recorded_read_back_queried_and_exported_with_the_op(tmp_path, changes, memwatch_cmd, device):
    pa = pytest.importorskip("pyarrow.parquet")
    t = torch.zeros(3, device=device)
    plain = torch.zeros(3)
    memwatch.watch(t, name="t", via="dispatch")
    memwatch.watch(plain, name="plain")
    trace = tmp_path / "run.mwt"
    memwatch.start(trace)
    t.add_(1); l1 = here()  # noqa: E702
    t[0] = 7; l2 = here()  # noqa: E702
    plain[1] = 2; l3 = here()  # noqa: E702
    memwatch.stop()
    back = memwatch.open_trace(trace).changes()
    assert [(c.tag, c.op, c.line, c.new_values) for c in back] == [
        ("t", "aten::add_.Tensor", l1, [1.0, 1.0, 1.0]),
        ("t", "aten::fill_.Scalar", l2, [7.0]),
        ("plain", None, l3, [2.0]),
    ]
    assert memwatch.open_trace(trace).state("t").tolist() == [7.0, 1.0, 1.0]
    assert memwatch.trace_info(trace)["version"] == memwatch.FORMAT_VERSION == 4

    q = memwatch_cmd("query", str(trace), "--tag", "t")
    assert q.returncode == 0, q.stderr
    head, *lines = q.stdout.splitlines()
    assert head.split() == ["seq", "time_ms", "tag", "variable", "at", "function", "thread", "changed", "op", "old", "->", "new"]
    assert [line.split()[-4:] for line in lines] == [
        ["aten::add_.Tensor", "0.0", "->", "1.0"],
        ["aten::fill_.Scalar", "1.0", "->", "7.0"],
    ], q.stdout
    q = memwatch_cmd("query", str(trace), "--format", "jsonl")
    assert [json.loads(x)["op"] for x in q.stdout.splitlines()] == ["aten::add_.Tensor", "aten::fill_.Scalar", None]
    # dump, blame and the table without an op column: cli/tests/ops.rs.

    out = tmp_path / "changes.parquet"
    e = memwatch_cmd("export", str(trace), "-o", str(out))
    assert e.returncode == 0, e.stderr
    table = pa.read_table(out)
    assert table.column("op").to_pylist() == ["aten::add_.Tensor", "aten::fill_.Scalar", None]
    assert table.column("line").to_pylist() == [l1, l2, l3]


@pytest.mark.parametrize("device", DEVICES)
def test_unwatch_by_tensor_or_tag_watching_and_collection_end_it(changes, device):
    t = torch.zeros(2, device=device)
    memwatch.watch(t, name="t", via="dispatch")
    assert _torch_dispatch.entered()
    memwatch.unwatch(t)
    assert (memwatch._memwatch._regions(), _torch_dispatch._entries, _torch_dispatch.entered()) == ([], {}, False)
    memwatch.watch(t, name="x", via="dispatch")
    memwatch.unwatch("x")
    assert not _torch_dispatch.entered()
    t.add_(1)
    assert changes == []
    with memwatch.watching(t, via="dispatch") as h:
        assert h.tag == "t"
        t.add_(1); line = here()  # noqa: E702
    t.add_(1)
    assert [(c.op, c.line) for c in changes] == [("aten::add_.Tensor", line)]
    assert not _torch_dispatch.entered()

    # Nothing else refers to it: the watch ends at the next line, its mirror freed, its name free.
    def scratch():
        tmp = torch.zeros(2, device=device)
        memwatch.watch(tmp, name="tmp", via="dispatch")
        (entry,) = _torch_dispatch._entries.values()
        tmp.add_(1)
        return weakref.ref(entry.mirror())

    mirror = scratch()
    assert memwatch._memwatch._regions() == []
    assert mirror() is None
    assert not _torch_dispatch.entered()
    again = torch.ones(2, device=device)
    memwatch.watch(again, name="tmp", via="dispatch")
    assert [c.tag for c in changes] == ["t", "tmp"]


@pytest.mark.parametrize("device", DEVICES)
def test_resizing_is_refused_and_an_out_resize_ends_the_watch(changes, device):
    t = torch.zeros(4, device=device)
    memwatch.watch(t, name="t", via="dispatch")
    for resize in (
        lambda: t.resize_(8),
        lambda: t.resize_as_(torch.zeros(8, device=device)),
        lambda: t.set_(torch.zeros(4, device=device)),
        lambda: t.untyped_storage().resize_(64),
    ):
        with pytest.raises(
            memwatch.MemwatchError,
            match=r"watches via=\"dispatch\" \('t'\): memwatch keeps a copy of it .* memwatch\.unwatch\('t'\) first",
        ):
            resize()
    t.resize_(4)  # its own shape: let through
    assert t.shape == (4,)
    # An out= argument that torch resizes: the op ran, the watch cannot go on.
    with pytest.warns(RuntimeWarning, match=r"aten::add\.out made 't' a float32 tensor of shape \(8,\) "):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "An output with one or more elements was resized", UserWarning)
            torch.add(torch.ones(8, device=device), 1, out=t)
    assert memwatch._memwatch._regions() == []
    assert changes == []
    t.resize_(16)  # not watched: resizes as usual (its storage was never pinned)
    assert t.shape == (16,)
    # The watch ended inside an op, where the mode cannot leave the stack: it
    # passes ops through until this thread's next watch or unwatch.
    assert _torch_dispatch.entered()
    other = bytearray(4)
    memwatch.watch(other, name="other")
    memwatch.unwatch(other)
    assert not _torch_dispatch.entered()


@pytest.mark.parametrize("device", DEVICES)
def test_what_the_dispatch_path_does_not_see(changes, device):
    t = torch.zeros(2, device=device)
    memwatch.watch(t, name="t", via="dispatch")
    # Another thread does not have the mode (torch keeps modes per thread).
    worker = threading.Thread(target=t.add_, args=(1,))
    worker.start()
    worker.join()
    assert changes == []
    # The next op that writes t shows what it finds, the other thread's write included.
    t.mul_(2); line = here()  # noqa: E702
    assert [(c.op, c.line, c.new_values) for c in changes] == [("aten::mul_.Tensor", line, [2.0, 2.0])]
    changes.clear()
    # Rebinding .data is no op either: the watch follows t to its new memory.
    t.data = torch.full((2,), 5.0, device=device)
    assert changes == []
    t.add_(1); line = here()  # noqa: E702
    assert [(c.line, c.old_values, c.new_values) for c in changes] == [(line, [2.0, 2.0], [6.0, 6.0])]
    if device == "cpu":
        changes.clear()
        t.numpy()[0] = 9  # numpy writes the memory directly, past the dispatcher
        assert changes == []


def test_a_thread_that_watches_is_covered():
    seen = []
    collect = memwatch.on_change(seen.append)

    def work():
        t = torch.zeros(2)
        memwatch.watch(t, name="w", via="dispatch")
        t.add_(1)
        memwatch.unwatch("w")
        seen.append(_torch_dispatch.entered())

    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    finally:
        memwatch.remove_callback(collect)
    assert [(c.op, c.thread_name) for c in seen[:-1]] == [("aten::add_.Tensor", worker.name)]
    assert seen[-1] is False


@pytest.mark.parametrize("device", DEVICES)
def test_a_write_inside_a_higher_order_op_is_seen_after_it(changes, device):
    t = torch.zeros(3, device=device)
    memwatch.watch(t, name="t", via="dispatch")

    def reads(x):
        return x + 1

    def writes(x):
        x.add_(2)
        return x.clone()

    torch.cond(torch.tensor(True), reads, reads, (t,))
    assert changes == []
    torch.cond(torch.tensor(True), writes, writes, (t,)); line = here()  # noqa: E702
    # The body ran below the mode: the change is the higher-order op's, on its line.
    assert [(c.op, c.line, c.new_values) for c in changes] == [("cond", line, [2.0] * 3)]


@pytest.mark.parametrize("device", DEVICES)
def test_dtypes_are_decoded_and_an_action_runs_at_the_op(changes, device):
    b = torch.zeros(2, dtype=torch.bfloat16, device=device)
    memwatch.watch(b, name="b", via="dispatch")
    b.add_(1.5)
    assert [(c.dtype, c.new_values) for c in changes] == [("<bfloat16", [1.5, 1.5])]
    f = torch.zeros(2, device=device)
    memwatch.watch(f, name="f", via="dispatch", condition="nonfinite", action="raise")
    f.add_(1)
    with pytest.raises(memwatch.MutationError, match="'f'"):
        f.div_(0)
    assert torch.isinf(f).all()  # the op ran: the error says what it did


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_say_what_to_do(device):
    t = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match=r"via must be one of 'memory', 'dispatch', not 'gpu'"):
        memwatch.watch(t, name="t", via="gpu")
    with pytest.raises(TypeError, match=r'via="dispatch" is for torch tensors, not bytearray'):
        memwatch.watch(bytearray(4), name="b", via="dispatch")
    with pytest.raises(TypeError, match=r"raw memory \(buffer=\) is watched through memory"):
        memwatch.watch(buffer=t.data_ptr(), size=8, name="r", via="dispatch")
    with pytest.raises(ValueError, match=r'mode="store" catches single stores to memory'):
        memwatch.watch(t, name="t", via="dispatch", mode="store")
    with pytest.raises(memwatch.UnsupportedError, match="a meta tensor"):
        memwatch.watch(torch.zeros(2, device="meta"), name="m", via="dispatch")
    h = memwatch.watch(t, name="t", via="dispatch")
    # The same tensor under its name again is that watch (a task run twice).
    assert memwatch.watch(t, name="t", via="dispatch").region == h.region
    with pytest.raises(ValueError, match="'t' is already watched"):
        memwatch.watch(t.clone(), name="t", via="dispatch")
    assert len(_torch_dispatch._entries) == 1
    if device != "cpu":
        with pytest.raises(memwatch.UnsupportedError, match=r'pass via="dispatch"'):
            memwatch.watch(t, name="mem")


def test_a_device_tensor_without_via_says_to_pass_via_dispatch():
    # A fake tensor on a CUDA device, so that this runs without a GPU too.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = torch.empty(4, device="cuda")
    assert t.device.type == "cuda"
    with pytest.raises(
        memwatch.UnsupportedError,
        match=r'cannot watch a tensor on cuda:0 through its memory: .* pass via="dispatch" to record every torch op',
    ):
        memwatch.watch(t, name="t")
