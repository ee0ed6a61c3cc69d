"""Shared fixtures: paths into the repository and a runner for the installed command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "format" / "tests" / "data" / "v1-sample.mwt"
GOLDEN_DUMP = ROOT / "cli" / "tests" / "data" / "v1-sample.dump"
BIN = Path(sys.executable).parent


@pytest.fixture
def golden() -> Path:
    return GOLDEN


def run(args: list[str], cwd_override: Path | None = None, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command with the venv's bin first on PATH, from the repository root."""
    env = dict(kw.pop("env", None) or os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    cwd = cwd_override or ROOT
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def memwatch_cmd():
    """Runs the installed `memwatch` console script."""

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        return run([str(BIN / "memwatch"), *args])

    return _run


def here() -> int:
    """The caller's current line number (put it on the line under test: `x[0] = 1; line = here()`)."""
    return sys._getframe(1).f_lineno


@pytest.fixture
def changes():
    """Collects every change seen during the test; unwatches everything after."""
    import memwatch

    seen: list = []
    collect = seen.append
    memwatch.clear_history()
    memwatch.on_change(collect)
    yield seen
    for group in [*memwatch._torch_module._modules, *memwatch._torch_module._optimizers]:
        group.unwatch()
    for watch, *_ in memwatch._memwatch._object_watches():
        try:
            memwatch._memwatch._unwatch_object(watch)
        except memwatch.NotWatchedError:
            pass  # ended meanwhile: its object was collected (the test's locals are gone)
    for var in list(memwatch._vars._watches):
        memwatch._vars.unwatch_var(var)
    memwatch.remove_callback(collect)
    for region, *_ in memwatch._memwatch._regions():
        try:
            memwatch._memwatch._unwatch(region)
        except memwatch.NotWatchedError:
            pass  # ended meanwhile: collected at the check the unwatch before made
    memwatch.clear_history()
    memwatch.configure(include=[], exclude=[])


def run_py(
    code: str,
    *args: str,
    env: dict | None = None,
    prefix: list[str] | None = None,
    input_text: str | None = None,
):
    """Run Python code (dedented) in a fresh interpreter of this venv, from the repository root
    (with ``input_text`` on its stdin)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [*(prefix or []), sys.executable, *args, "-c", textwrap.dedent(code)],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
        cwd=ROOT,
    )


def unprivileged_prefix() -> list[str] | None:
    """How to run a command without CAP_SYS_PTRACE and friends: as is when
    not root; as root in a new user namespace (capabilities there do not
    count for userfaultfd, which checks the initial namespace)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run([unshare, "--user", "--map-root-user", "true"], capture_output=True)
    return [unshare, "--user", "--map-root-user"] if probe.returncode == 0 else None
