"""The ``memwatch`` console script: hands the command line to the Rust CLI."""

from __future__ import annotations

import os
import sys

from memwatch import _memwatch


def main(argv: list[str] | None = None) -> int:
    """Run ``memwatch`` with ``argv`` (default: ``sys.argv[1:]``); return its exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "memwatch"
    if prog in ("__main__.py", "-c", ""):
        prog = "memwatch"
    sys.stdout.flush()
    # `record --vars` puts this folder's sitecustomize on the child's path.
    os.environ["MEMWATCH_BOOT_DIR"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
    try:
        return _memwatch._cli_main([prog, *args])
    except KeyboardInterrupt:
        return 130
