"""A torch DataLoader's workers are processes of the run: each records the
changes its `__getitem__` makes, in a trace of its own."""

from __future__ import annotations

import json

import pytest

import memwatch
from test_multiprocess import line_of, members, props, record

pytest.importorskip("torch")


def test_dataloader_workers_record_their_changes(tmp_path):
    # GIVEN a DataLoader with 2 workers whose dataset watches and writes an array per item
    record(
        tmp_path,
        """
        import json, os
        import numpy as np
        import torch
        import memwatch

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return 6

            def __getitem__(self, i):
                a = np.zeros(2, dtype=np.float32)
                memwatch.watch(a, name="item")
                a[0] = i * 2.0 + 1  # the worker's write
                return torch.tensor([float(os.getpid()), a[0]])

        if __name__ == "__main__":
            got = [row.tolist() for batch in torch.utils.data.DataLoader(Items(), num_workers=2) for row in batch]
            open("results.json", "w").write(json.dumps([[int(p), v] for p, v in got]))
        """,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    line = line_of(tmp_path, "the worker's write")
    found = members(tmp_path)
    # THEN each of the 2 workers wrote its own trace, with exactly its items' values
    assert set(found) == {pid for pid, _ in results} and len(found) == 2
    root_pid = memwatch.trace_info(tmp_path / "run.mwt")["pid"]
    for pid, path in found.items():
        assert props(path)["parent"] == str(root_pid)
        changes = memwatch.open_trace(path).changes(tag="item")
        assert sorted(c.new_values[0] for c in changes) == sorted(v for p, v in results if p == pid)
        assert all(c.indices == [0] and c.line == line for c in changes)
