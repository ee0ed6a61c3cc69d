"""watch_module and watch_optimizer: a whole model's parameters and
buffers, an optimizer's state, each tagged by its qualified name, followed
when the program replaces or converts them."""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest

import memwatch
from conftest import here
from test_record_cli import mw

torch = pytest.importorskip("torch")
nn = torch.nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def step_of(model, opt, x):
    opt.zero_grad()
    model(x).sum().backward()


def test_every_parameter_and_buffer_by_qualified_name(changes):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    handle = memwatch.watch_module(model)
    assert handle.name == "model"
    assert handle.tags == [
        "model.0.weight",
        "model.0.bias",
        "model.1.weight",
        "model.1.bias",
        "model.1.running_mean",
        "model.1.running_var",
        "model.1.num_batches_tracked",
    ]
    assert handle.handles["0.weight"].variable == "model.0.weight"
    assert len(handle) == 7 and "15 elements" not in repr(handle)
    assert repr(handle) == "<ModuleWatchHandle 'model': 7 tensors, 28 elements>"
    x = torch.ones(5, 4)
    with torch.no_grad():
        model[0].weight[1, 2] = 7.0; line = here()  # noqa: E702
    assert [(c.tag, c.line, c.indices, c.new_values) for c in changes] == [("model.0.weight", line, [(1, 2)], [7.0])]
    changes.clear()
    model(x); line = here()  # noqa: E702 - training-mode batch norm updates its statistics
    assert sorted(c.tag for c in changes if c.line == line) == [
        "model.1.num_batches_tracked",
        "model.1.running_mean",
        "model.1.running_var",
    ]
    nbt = next(c for c in changes if c.tag == "model.1.num_batches_tracked")
    assert (nbt.old_values, nbt.new_values) == ([0], [1])
    changes.clear()
    head = nn.Linear(2, 2)
    handle2 = memwatch.watch_module(head, name="head", buffers=False)
    assert handle2.tags == ["head.weight", "head.bias"]


def test_tied_weights_are_watched_once(changes):
    emb = nn.Embedding(5, 3)
    out = nn.Linear(3, 5, bias=False)
    out.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "out": out})
    handle = memwatch.watch_module(model, name="lm")
    assert handle.tags == ["lm.emb.weight"]


def test_optimizer_step_is_on_its_line_for_every_parameter(changes):
    model = mlp()
    memwatch.watch_module(model, name="model")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(2, 4)
    step_of(model, opt, x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    changes.clear()
    opt.step(); line = here()  # noqa: E702
    got = {c.tag: c for c in changes}
    assert sorted(got) == ["model.0.bias", "model.0.weight", "model.2.bias", "model.2.weight"]
    for n, p in model.named_parameters():
        c = got[f"model.{n}"]
        assert c.line == line and c.function == "test_optimizer_step_is_on_its_line_for_every_parameter"
        # Only the elements the step changed, each old and new value exact.
        changed = (before[n] != p.detach()).flatten().nonzero().flatten().tolist()
        assert len(c.new_values) == len(changed)
        assert c.old_values == [before[n].flatten()[i].item() for i in changed]
        assert c.new_values == [p.detach().flatten()[i].item() for i in changed]


def test_optimizer_state_is_watched_once_it_exists(changes):
    model = mlp()
    memwatch.watch_module(model, name="model")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ow = memwatch.watch_optimizer(opt)
    assert (ow.name, ow.tags) == ("opt", [])  # SGD makes its momentum in the first step
    x = torch.ones(2, 4)
    step_of(model, opt, x)
    opt.step()
    assert ow.tags == [
        "opt.model.0.weight.momentum_buffer",
        "opt.model.0.bias.momentum_buffer",
        "opt.model.2.weight.momentum_buffer",
        "opt.model.2.bias.momentum_buffer",
    ]
    mom = opt.state[model[2].bias]["momentum_buffer"]
    before = mom.clone()
    changes.clear()
    step_of(model, opt, x)
    opt.step(); line = here()  # noqa: E702
    c = next(c for c in changes if c.tag == "opt.model.2.bias.momentum_buffer")
    assert c.line == line
    assert (c.old_values, c.new_values) == (before.tolist(), mom.tolist())
    assert {c.tag for c in changes if c.line == line} >= {"model.2.bias", "opt.model.0.weight.momentum_buffer"}


def test_adam_moments_and_step_count_and_unnamed_parameters(changes):
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    ow = memwatch.watch_optimizer(opt, name="adam")
    p.grad = torch.tensor([1.0, -1.0, 0.5])
    opt.step()
    assert sorted(ow.tags) == ["adam.param0_0.exp_avg", "adam.param0_0.exp_avg_sq", "adam.param0_0.step"]
    changes.clear()
    opt.step(); line = here()  # noqa: E702
    by_tag = {c.tag: c for c in changes}
    assert by_tag["adam.param0_0.step"].line == line
    assert (by_tag["adam.param0_0.step"].old_values, by_tag["adam.param0_0.step"].new_values) == ([1.0], [2.0])
    assert by_tag["adam.param0_0.exp_avg"].new_values == opt.state[p]["exp_avg"].tolist()


def test_reassigned_parameter_and_submodule_are_followed(changes):
    model = mlp()
    handle = memwatch.watch_module(model, name="model")
    old = model[0].weight
    model[0].weight = nn.Parameter(torch.zeros(3, 4))
    assert handle.handles["0.weight"].address == model[0].weight.data_ptr()
    assert old.data_ptr() not in [a for _, _, a, _, _ in memwatch._memwatch._regions()]
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0; line = here()  # noqa: E702
    assert [(c.tag, c.line, c.old_values, c.new_values) for c in changes] == [("model.0.weight", line, [0.0], [1.0])]
    changes.clear()
    model[2] = nn.Linear(3, 6)
    assert handle.tags[-2:] == ["model.2.weight", "model.2.bias"]
    assert handle.handles["2.weight"].size == 6 * 3 * 4
    with torch.no_grad():
        model[2].bias.fill_(2.0); line = here()  # noqa: E702
    assert [(c.tag, c.line, c.new_values) for c in changes] == [("model.2.bias", line, [2.0] * 6)]
    model[2] = nn.ReLU()
    assert handle.tags == ["model.0.weight", "model.0.bias"]


def test_converted_model_is_followed(changes):
    model = mlp()
    handle = memwatch.watch_module(model, name="model")
    model.float()  # nothing moves: the same watches
    assert [h.dtype for h in handle.handles.values()] == ["<f4"] * 4
    model.double()
    assert [h.dtype for h in handle.handles.values()] == ["<f8"] * 4
    assert handle.handles["0.bias"].address == model[0].bias.data_ptr()
    with torch.no_grad():
        model[0].bias.mul_(0); line = here()  # noqa: E702
    assert [(c.tag, c.line, c.new_values) for c in changes] == [("model.0.bias", line, [0.0] * 3)]
    # param.data = other has no hook: refresh() follows it.
    model[0].bias.data = torch.ones(3, dtype=torch.float64)
    handle.refresh()
    assert handle.handles["0.bias"].address == model[0].bias.data_ptr()


def test_converted_model_is_followed_when_torch_swaps_tensors(changes):
    """With swap_module_params_on_conversion, _apply swaps each parameter's
    contents with torch.utils.swap_tensors, which refuses tensors that have
    a weak reference: memwatch holds none."""
    was = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = nn.Linear(3, 2)
        weight = model.weight
        handle = memwatch.watch_module(model, name="model")
        model.double()
        assert model.weight is weight and weight.dtype == torch.float64
        assert handle.handles["weight"].dtype == "<f8" and handle.handles["weight"].address == weight.data_ptr()
        with torch.no_grad():
            weight.add_(1); line = here()  # noqa: E702
        assert [(c.tag, c.line, len(c.new_values)) for c in changes] == [("model.weight", line, 6)]
    finally:
        torch.__future__.set_swap_module_params_on_conversion(was)


def test_tensor_moved_where_memwatch_cannot_watch_ends_with_a_warning(changes):
    model = nn.Linear(2, 2)
    handle = memwatch.watch_module(model, name="model")
    with pytest.warns(RuntimeWarning, match=r"model\.weight, model\.bias moved to meta, memory memwatch cannot watch, so their watches have ended") as w:
        model.to("meta"); line = here()  # noqa: E702
    assert {r.lineno for r in w} == {line} and {r.filename for r in w} == {__file__}
    assert handle.tags == [] and memwatch._memwatch._regions() == []
    no_data = "on meta: a meta tensor has no data to watch"
    assert handle.skipped == {"weight": no_data, "bias": no_data}
    with pytest.raises(memwatch.UnsupportedError, match=r"nothing of 'm2' can be watched: weight on meta.*materialize the model"):
        memwatch.watch_module(nn.Linear(2, 2, device="meta"), name="m2")


def sgd_steps(model, opt, n=2):
    x = torch.ones(4, 3)
    for _ in range(n):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step(); line = here()  # noqa: E702
    return line


def test_via_dispatch_records_each_op_of_a_module_and_its_optimizer(changes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))  # every gradient nonzero
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    memwatch.watch_module(model, name="m", via="dispatch")
    memwatch.watch_optimizer(opt, name="o", via="dispatch")
    before = model[0].bias.detach().clone()
    line = sgd_steps(model, opt)
    by_tag = {}
    for c in changes:
        by_tag.setdefault(c.tag, []).append(c)
    assert set(by_tag) >= {"m.0.weight", "m.0.bias", "m.2.weight", "m.2.bias", "o.m.0.bias.momentum_buffer"}
    bias = by_tag["m.0.bias"]
    assert [c.line for c in bias] == [line, line]
    assert {c.op for c in bias} == {"aten::add_.Tensor"}  # SGD's update of a CPU parameter, op by op
    assert np.allclose(bias[0].old_values, before.numpy()[bias[0].indices])  # exactly the elements the op changed
    assert np.allclose(bias[-1].new_values, model[0].bias.detach().numpy()[bias[-1].indices])
    # The momentum buffer is watched from the end of the step that made it:
    # the second step's update (SGD's buf.mul_(momentum).add_(grad)) is
    # its changes, one per op.
    momentum = by_tag["o.m.0.bias.momentum_buffer"]
    assert [(c.line, c.op) for c in momentum] == [(line, "aten::mul_.Tensor"), (line, "aten::add_.Tensor")]


def test_via_auto_watches_cpu_tensors_through_memory(changes):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = memwatch.watch_module(model, name="m", via="auto")
    line = sgd_steps(model, opt, n=1)
    assert {(c.tag, c.line, c.op) for c in changes} == {("m.weight", line, None), ("m.bias", line, None)}
    assert handle.skipped == {}


def test_via_is_checked(changes):
    with pytest.raises(ValueError, match="via must be 'memory', 'dispatch' or 'auto', not 'gpu'"):
        memwatch.watch_module(nn.Linear(1, 1), name="m", via="gpu")
    with pytest.raises(ValueError, match='mode="store" catches single stores to CPU memory'):
        memwatch.watch_optimizer(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), name="o", mode="store", via="auto")
    assert memwatch._torch_module._modules == [] and memwatch._torch_module._optimizers == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_via_auto_follows_a_model_to_the_gpu(changes):
    model = nn.Linear(3, 2)
    handle = memwatch.watch_module(model, name="m", via="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the move ends no watch
        model.cuda()
    assert handle.tags == ["m.weight", "m.bias"] and handle.skipped == {}
    with torch.no_grad():
        model.bias.add_(1); line = here()  # noqa: E702
    [c] = [c for c in changes if c.tag == "m.bias"]
    assert c.line == line and c.op == "aten::add_.Tensor" and np.allclose(np.asarray(c.new_values) - np.asarray(c.old_values), 1)


def test_unwatch_by_model_handle_or_name_and_errors(changes):
    model = mlp()
    handle = memwatch.watch_module(model, name="model")
    with pytest.raises(ValueError, match="this module is already watched as 'model'"):
        memwatch.watch_module(model, name="again")
    with pytest.raises(ValueError, match="'model' is already watched"):
        memwatch.watch_module(nn.Linear(1, 1), name="model")
    with pytest.raises(TypeError, match=r"watch_module\(\) needs a torch.nn.Module, not Tensor; use watch\(\)"):
        memwatch.watch_module(torch.zeros(3), name="t")
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer, not Sequential"):
        memwatch.watch_optimizer(model, name="o")
    memwatch.unwatch(model)
    assert memwatch._memwatch._regions() == [] and repr(handle).endswith("unwatched>")
    with pytest.raises(memwatch.NotWatchedError, match="is not watched any more"):
        memwatch.unwatch(handle)
    h2 = memwatch.watch_module(model, name="m")
    memwatch.unwatch("m")
    assert not h2.active and memwatch._memwatch._regions() == []
    with memwatch.watch_module(model, name="m") as h3:
        assert len(h3) == 4
    assert memwatch._memwatch._regions() == []
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    memwatch.watch_optimizer(opt)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    assert len(memwatch._memwatch._regions()) == 4
    memwatch.unwatch(opt)
    assert memwatch._memwatch._regions() == []
    opt.step()  # its hooks are gone: nothing is watched again


def test_a_failed_watch_leaves_nothing_watched(changes):
    taken = torch.zeros(2)
    memwatch.watch(taken, name="model.0.bias")
    with pytest.raises(ValueError, match="'model.0.bias' is already watched"):
        memwatch.watch_module(mlp(), name="model")
    assert [t for _, t, *_ in memwatch._memwatch._regions()] == ["model.0.bias"]
    assert memwatch._torch_module._modules == []


def test_load_state_dict_copies_are_changes_and_new_state_is_followed(changes):
    model = mlp()
    memwatch.watch_module(model, name="model")
    other = mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict()); line = here()  # noqa: E702
    assert sorted(c.tag for c in changes if c.line == line) == [
        "model.0.bias", "model.0.weight", "model.2.bias", "model.2.weight",
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ow = memwatch.watch_optimizer(opt)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    first = ow.handles["model.0.bias.momentum_buffer"].address
    opt.load_state_dict(saved)  # new state tensors: followed
    now = opt.state[model[0].bias]["momentum_buffer"]
    assert ow.handles["model.0.bias.momentum_buffer"].address == now.data_ptr() != first


def test_recorded_trace_of_a_training_loop(tmp_path):
    """Under `memwatch record`: every step's changes are in the trace, and the
    rebuilt state of each parameter equals the model's at the end."""
    prog = tmp_path / "train.py"
    prog.write_text(
        "import numpy as np, torch, memwatch\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))\n"
        "memwatch.watch_module(model)\n"
        "opt = torch.optim.Adam(model.parameters(), lr=0.01)\n"
        "memwatch.watch_optimizer(opt)\n"
        "x, y = torch.randn(32, 8), torch.randn(32, 1)\n"
        "for step in range(5):\n"
        "    opt.zero_grad()\n"
        "    torch.nn.functional.mse_loss(model(x), y).backward()\n"
        "    opt.step()\n"
        "np.save('final.npy', model[2].weight.detach().numpy())\n"
    )
    mw("record", "-o", "t.mwt", sys.executable, str(prog), cwd=tmp_path)
    trace = memwatch.open_trace(tmp_path / "t.mwt")
    steps = [c for c in trace.changes() if c.tag == "model.2.weight"]
    assert [c.line for c in steps] == [11] * 5
    import numpy as np

    final = trace.state("model.2.weight")
    assert np.array_equal(final, np.load(tmp_path / "final.npy"))
    moments = {c.tag for c in trace.changes() if c.tag.startswith("opt.")}
    assert "opt.model.0.weight.exp_avg" in moments and "opt.model.2.bias.step" in moments


def test_the_pytorch_guide_examples_run(tmp_path):
    """docs/pytorch.md's Python examples run as written, saved as train.py:
    the comment lines that end a block are what it prints, and a block the
    guide says "ends with" a ```text block ends its stderr with those lines."""
    import re

    from conftest import ROOT, run

    guide = (ROOT / "docs" / "pytorch.md").read_text()
    found = list(re.finditer(r"```python\n(.*?)```(.*?)(?=```python|\Z)", guide, re.S))
    assert found, "docs/pytorch.md has Python examples"
    for m in found:
        src, after = m.group(1), m.group(2)
        (tmp_path / "train.py").write_text(src)
        r = run([sys.executable, "train.py"], cwd_override=tmp_path)
        ends = re.match(r"\s*`python train.py` ends with[^`]*```text\n(.*?)```", after, re.S)
        if ends:
            want = ends.group(1).splitlines()
            assert r.returncode != 0, src
            assert r.stderr.splitlines()[-len(want):] == want, r.stderr
            continue
        assert r.returncode == 0, f"{src}\n{r.stderr}"
        tail = []
        for line in reversed(src.splitlines()):
            if not line.startswith("# "):
                break
            tail.insert(0, line[2:])
        assert tail, f"the example ends with what it prints:\n{src}"
        assert r.stdout.splitlines() == tail, src


def test_a_collected_model_ends_its_watch(changes):
    import gc

    def train_briefly():
        model = mlp()
        memwatch.watch_module(model, name="local")
        with torch.no_grad():
            model[0].bias.add_(1)

    train_briefly()
    gc.collect()
    memwatch.check()  # the tensors' watches end as collected at a boundary
    assert memwatch._torch_module._modules == []
    assert [t for _, t, *_ in memwatch._memwatch._regions()] == []
    again = mlp()
    assert memwatch.watch_module(again, name="local").tags[0] == "local.0.weight"  # the name is free again


def test_building_other_modules_does_not_walk_a_watched_model(changes):
    model = mlp()
    memwatch.watch_module(model, name="model")
    walks = []
    real = model.named_modules
    model.named_modules = lambda *a, **k: (walks.append(1), real(*a, **k))[1]
    others = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(20)]
    assert len(walks) <= 1 and len(others) == 20  # at most one walk: the set of its submodules, built once
    # An assignment into the model is still followed, and so is one into a
    # submodule that joined the model after the watch began.
    block = nn.Sequential()
    model.add_module("extra", block)
    block.add_module("fc", nn.Linear(2, 2))
    assert "model.extra.fc.weight" in memwatch._torch_module._modules[0].tags
    with torch.no_grad():
        block.fc.bias.add_(1); line = here()  # noqa: E702
    assert [(c.tag, c.line) for c in changes] == [("model.extra.fc.bias", line)]
