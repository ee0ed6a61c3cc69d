"""memwatch.explain_inplace(): autograd's "modified by an inplace operation"
error gets notes naming the line and the aten op that modified the saved
tensor, and where it was saved; `memwatch record --torch-inplace`."""

from __future__ import annotations

import runpy
import sys
import threading
import traceback
from pathlib import Path

import pytest

import memwatch
from conftest import BIN, here, run

torch = pytest.importorskip("torch", reason="torch is installed only in the CPython 3.12 test venv")
import torch.nn.functional as F  # noqa: E402

from memwatch import _torch_inplace  # noqa: E402

HERE = Path(__file__).resolve().parent
FILE = Path(__file__).name
PHRASE = "one of the variables needed for gradient computation has been modified by an inplace operation"


@pytest.fixture(autouse=True)
def in_tests_dir(monkeypatch):
    """Locations show relative to the working directory: `test_torch_inplace.py:12`."""
    monkeypatch.chdir(HERE)
    yield
    memwatch.explain_inplace(False)


@pytest.fixture
def explain():
    with memwatch.explain_inplace():
        yield


def error_of(fn) -> RuntimeError:
    with pytest.raises(RuntimeError, match=PHRASE) as info:
        fn()
    return info.value


def notes_of(fn) -> list[str]:
    return getattr(error_of(fn), "__notes__", [])


def at(line: int, function: str = "") -> str:
    return f"{FILE}:{line}" + (f" in {function}()" if function else "")


def step(x):
    y = x.sigmoid()
    y.mul_(2)
    y.sum().backward()


def test_mul_of_a_saved_output_names_the_line_and_the_op(explain):
    first = step.__code__.co_firstlineno
    assert notes_of(lambda: step(torch.randn(3, requires_grad=True))) == [
        f"memwatch: tensor [torch.FloatTensor [3]] saved by SigmoidBackward0 at {at(first + 1)} (y = x.sigmoid()) "
        f"was modified in place at {at(first + 2, 'step')} (y.mul_(2)): aten::mul_.Tensor (version 0 -> 1)"
    ]


def test_torch_message_and_traceback_are_torchs_own(explain):
    # GIVEN the same mistake with explain_inplace off and on
    def mistake():
        x = torch.randn(3, requires_grad=True)
        y = x.exp()
        y.add_(1)
        y.sum().backward()

    with memwatch.explain_inplace(False):
        plain = error_of(mistake)
    explained = error_of(mistake)
    # THEN the message is torch's, memwatch only adds notes, and no frame
    # of the traceback is memwatch's
    assert str(explained) == str(plain)
    assert not hasattr(plain, "__notes__")
    assert len(explained.__notes__) == 1
    package = str(Path(memwatch.__file__).parent)
    files = [f.filename for f in traceback.extract_tb(explained.__traceback__)]
    assert not [f for f in files if f.startswith(package)], files
    assert files[0] == __file__ and files[-1].endswith("graph.py")


def bump(t):
    t += 1


def test_plus_equals_in_another_function(explain):
    x = torch.randn(4, requires_grad=True)
    saved = here() + 1
    y = x.relu()
    bump(y)
    line = bump.__code__.co_firstlineno + 1
    assert notes_of(lambda: y.sum().backward()) == [
        f"memwatch: tensor [torch.FloatTensor [4]] saved by ReluBackward0 at {at(saved)} (y = x.relu()) "
        f"was modified in place at {at(line, 'bump')} (t += 1): aten::add_.Tensor (version 0 -> 1)"
    ]


def test_write_through_a_view(explain):
    x = torch.randn(2, 3, requires_grad=True)
    y = x.sigmoid()
    line = here() + 1
    y[0] = 0
    (note,) = notes_of(lambda: y.sum().backward())
    assert note.startswith("memwatch: tensor [torch.FloatTensor [2, 3]] saved by SigmoidBackward0 at ")
    assert note.endswith(
        f"was modified in place at {at(line, 'test_write_through_a_view')} (y[0] = 0): "
        "aten::fill_.Scalar on a view of it (version 0 -> 1)"
    )


def test_write_through_out(explain):
    x = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    saved = here() + 1
    c = x * b
    line = here() + 1
    torch.exp(x.detach(), out=b)
    assert notes_of(lambda: c.sum().backward()) == [
        f"memwatch: tensor [torch.FloatTensor [3]] saved by MulBackward0 at {at(saved)} (c = x * b) was modified "
        f"in place at {at(line, 'test_write_through_out')} (torch.exp(x.detach(), out=b)): aten::exp.out "
        "(version 0 -> 1)"
    ]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, h):
        h = self.fc(h).sigmoid()
        F.relu(h, inplace=True)
        return h


def test_inplace_relu_in_a_module_forward(explain):
    first = Net.forward.__code__.co_firstlineno
    notes = notes_of(lambda: Net()(torch.randn(2, 3)).sum().backward())
    assert notes == [
        f"memwatch: tensor [torch.FloatTensor [2, 3]] saved by SigmoidBackward0 at {at(first + 1)} "
        f"(h = self.fc(h).sigmoid()) was modified in place at {at(first + 2, 'Net.forward')} "
        "(F.relu(h, inplace=True)): aten::relu_ (version 0 -> 1)"
    ]


def test_autograd_grad_and_two_writes(explain):
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    first = here() + 1
    y.mul_(2)
    y.add_(1)
    notes = notes_of(lambda: torch.autograd.grad(y.sum(), x))
    fn = "test_autograd_grad_and_two_writes"
    assert notes[0].endswith(f"in place at {at(first, fn)} (y.mul_(2)): aten::mul_.Tensor (version 0 -> 1)")
    assert notes[1:] == [f"memwatch: and at {at(first + 1, fn)} (y.add_(1)): aten::add_.Tensor (version 1 -> 2)"]


def test_a_parameter_updated_between_forward_and_backward(explain):
    w = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(3, requires_grad=True)
    saved = here() + 1
    loss = (w * x).sum()
    w.grad = torch.ones(3)
    line = here() + 2
    with torch.no_grad():
        w -= 0.1 * w.grad
    assert notes_of(loss.backward) == [
        f"memwatch: tensor [torch.FloatTensor [3]] saved by MulBackward0 at {at(saved)} (loss = (w * x).sum()) "
        f"was modified in place at {at(line, 'test_a_parameter_updated_between_forward_and_backward')} "
        "(w -= 0.1 * w.grad): aten::sub_.Tensor (version 0 -> 1)"
    ]


def test_other_elements_of_the_same_storage(explain):
    # torch counts versions per storage: writing a[2] bumps the version of
    # the saved view a[:2] too
    x = torch.randn(3, requires_grad=True)
    w = torch.randn(2, requires_grad=True)
    a = x * 1
    b = a[:2]
    c = b * w
    line = here() + 1
    a[2] = 5
    (note,) = notes_of(lambda: c.sum().backward())
    assert note.endswith(
        f"at {at(line, 'test_other_elements_of_the_same_storage')} (a[2] = 5): aten::fill_.Scalar on other "
        "elements of its storage (torch counts versions per storage) (version 0 -> 1)"
    )


def test_off_adds_nothing_and_restores_what_it_wrapped():
    originals = (torch.autograd._engine_run_backward, torch.autograd.graph._engine_run_backward)
    backward, grad = torch.autograd.backward, torch.autograd.grad
    memwatch.explain_inplace()
    assert torch.autograd._engine_run_backward is not originals[0]
    memwatch.explain_inplace(False)
    assert (torch.autograd._engine_run_backward, torch.autograd.graph._engine_run_backward) == originals
    assert (torch.autograd.backward, torch.autograd.grad) == (backward, grad)
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    assert _get_current_dispatch_mode_stack() == []
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    y.mul_(2)
    assert not hasattr(error_of(lambda: y.sum().backward()), "__notes__")


def test_context_manager_and_idempotence():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    original = torch.autograd._engine_run_backward
    with memwatch.explain_inplace() as on:
        memwatch.explain_inplace()  # twice is once
        assert torch.autograd._engine_run_backward.__wrapped__ is original
        assert len(_get_current_dispatch_mode_stack()) == 1
        assert repr(on) == "memwatch.explain_inplace(on)"
        with memwatch.explain_inplace(False):
            assert torch.autograd._engine_run_backward is original
            assert _get_current_dispatch_mode_stack() == []
        assert torch.autograd._engine_run_backward.__wrapped__ is original
        assert len(_get_current_dispatch_mode_stack()) == 1
    assert torch.autograd._engine_run_backward is original
    assert _get_current_dispatch_mode_stack() == []


def test_a_write_from_a_thread_it_does_not_cover(explain):
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    t = threading.Thread(target=lambda: y.mul_(2), name="worker")
    t.start()
    t.join()
    (note,) = notes_of(lambda: y.sum().backward())
    assert " saved by ExpBackward0 at " in note
    assert "is at version 1, not 0, but memwatch saw no in-place write to its memory since it was saved" in note
    assert "a thread explain_inplace() does not cover (it covers MainThread; call it in that thread too)" in note


def test_a_thread_that_turns_it_on_is_covered(explain):
    x = torch.randn(3, requires_grad=True)
    y = x.exp()

    def worker():
        memwatch.explain_inplace()
        y.mul_(2)

    t = threading.Thread(target=worker, name="worker")
    t.start()
    t.join()
    line = worker.__code__.co_firstlineno + 2
    (note,) = notes_of(lambda: y.sum().backward())
    assert note.endswith(
        f"at {at(line, 'test_a_thread_that_turns_it_on_is_covered.<locals>.worker')} in thread 'worker' "
        "(y.mul_(2)): aten::mul_.Tensor (version 0 -> 1)"
    )


def test_saved_before_it_was_on():
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    with memwatch.explain_inplace():
        line = here() + 1
        y.mul_(3)
        assert notes_of(lambda: y.sum().backward()) == [
            "memwatch: tensor [torch.FloatTensor [3]] saved by ExpBackward0 was modified in place at "
            f"{at(line, 'test_saved_before_it_was_on')} (y.mul_(3)): aten::mul_.Tensor (version 0 -> 1)"
        ]


def test_without_saved_tensor_memory_it_names_the_write_that_fits(explain, monkeypatch):
    # GIVEN a torch whose SavedTensor has no .data (before 2.15): memwatch
    # finds the node but not the tensor's memory
    found = _torch_inplace._find_saved
    monkeypatch.setattr(_torch_inplace, "_find_saved", lambda *a: (found(*a)[0], None))
    x = torch.randn(5, requires_grad=True)
    y = x.exp()
    line = here() + 1
    y.mul_(2)
    (note,) = notes_of(lambda: y.sum().backward())
    assert note.startswith(
        "memwatch: tensor [torch.FloatTensor [5]] saved by ExpBackward0 at "
    ) and "memwatch cannot be sure which write modified it (torch does not show saved tensors' memory" in note
    assert note.endswith(
        f"was at {at(line, 'test_without_saved_tensor_memory_it_names_the_write_that_fits')} (y.mul_(2)): "
        "aten::mul_.Tensor (version 0 -> 1)"
    )


def test_memwatch_never_replaces_the_error(explain, monkeypatch):
    def broken(*_):
        raise KeyError("boom")

    monkeypatch.setattr(_torch_inplace, "_notes", broken)
    x = torch.randn(3, requires_grad=True)
    y = x.exp()
    y.mul_(2)
    assert notes_of(lambda: y.sum().backward()) == ["memwatch: could not look into this error (KeyError: 'boom')"]


def test_other_errors_and_torch_func_are_untouched(explain):
    with pytest.raises(RuntimeError, match="does not require grad") as info:
        torch.randn(3).sum().backward()
    assert not hasattr(info.value, "__notes__")
    # memwatch installs no saved-tensor hooks: under them torch would stop
    # checking versions, and torch.func.grad refuses to run (its first call
    # imports half of torch, too slow for here)
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None


def test_needs_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"explains errors of PyTorch's autograd, but torch cannot be imported"):
        memwatch.explain_inplace()
    memwatch.explain_inplace(False)  # off needs nothing


PROGRAM = """\
import sys
print("torch" in sys.modules, file=sys.stderr)
import torch

def step(x):
    y = x.tanh()
    y.mul_(2)
    return y.sum()

step(torch.randn(3, requires_grad=True)).backward()
"""


def test_record_torch_inplace(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    p = run([str(BIN / "memwatch"), "record", "--torch-inplace", sys.executable, "prog.py"], cwd_override=tmp_path)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert lines[0] == "False"  # torch is imported by the program, not before it
    error = next(i for i, line in enumerate(lines) if line.startswith("RuntimeError: " + PHRASE))
    assert lines[error + 1 :] == [
        "memwatch: tensor [torch.FloatTensor [3]] saved by TanhBackward0 at prog.py:6 (y = x.tanh()) was modified "
        "in place at prog.py:7 in step() (y.mul_(2)): aten::mul_.Tensor (version 0 -> 1)",
        "memwatch: no trace written: the program watched nothing (--torch-inplace needs no watch)",
    ]
    assert not (tmp_path / "prog.mwt").exists()


def test_record_torch_inplace_leaves_a_program_without_torch_alone(tmp_path):
    prog = tmp_path / "plain.py"
    prog.write_text('import sys\nprint("torch" in sys.modules)\n')
    p = run([str(BIN / "memwatch"), "record", "--torch-inplace", sys.executable, "plain.py"], cwd_override=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "False\n"


def test_record_help_mentions_torch_inplace(memwatch_cmd):
    r = memwatch_cmd("record", "--help")
    assert r.returncode == 0
    assert "--torch-inplace" in r.stdout and "memwatch.explain_inplace()" in r.stdout
    assert "memwatch record --torch-inplace python train.py" in r.stdout


def test_the_guide_shows_real_output(tmp_path, monkeypatch):
    # docs/pytorch.md shows a program (train.py) and what it prints: run it
    # here and compare the error's last lines
    doc = (HERE.parent / "docs" / "pytorch.md").read_text()
    section = doc.split("\n## \"Modified by an inplace operation\"", 1)[1]  # the section on explain_inplace()
    program = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert "explain_inplace" in program
    (tmp_path / "train.py").write_text(program)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=PHRASE) as info:
        runpy.run_path("train.py", run_name="__main__")
    got = traceback.format_exception_only(info.value)
    assert "".join(got).splitlines() == shown[shown.index(next(s for s in shown if s.startswith("RuntimeError"))) :]
