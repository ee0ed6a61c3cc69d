"""Put on ``PYTHONPATH`` by ``memwatch record --vars`` and
``--torch-inplace``: watches the variables in ``$MEMWATCH_VARS`` from the
program's first line, with ``$MEMWATCH_TORCH_INPLACE=1`` turns
``memwatch.explain_inplace()`` on once the program imports torch (an import
hook: torch is not imported for it), then runs the ``sitecustomize`` this
module shadows, if there is one.

Every Python process of the run does this (the folder stays on
``PYTHONPATH`` for the processes it starts: multiprocessing's spawn and
forkserver children, ``subprocess``, torchrun's ranks), while
``$MEMWATCH_TRACE`` is set; each records to its own trace (see
``memwatch._session._trace_for_this_process``). A process that cannot do it
(another Python without memwatch) says so on stderr and runs on.
"""

import os
import sys


def _memwatch_boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # Not in sys.path: the program's own imports do not see this folder.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

    if os.environ.get("MEMWATCH_TRACE"):
        try:
            from memwatch import _vars

            _vars._boot_from_env()
        except Exception as e:  # the program runs on, without the watches
            sys.stderr.write(f"memwatch: --vars could not start ({type(e).__name__}: {e})\n")
        if os.environ.get("MEMWATCH_TORCH_INPLACE") == "1":
            try:
                from memwatch import _torch_inplace

                _torch_inplace._boot_from_env()
            except Exception as e:  # the program runs on, unexplained
                sys.stderr.write(f"memwatch: --torch-inplace could not start ({type(e).__name__}: {e})\n")

    # The sitecustomize this one shadows (a virtualenv's, a distribution's).
    me = sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401
    except ImportError:
        pass
    finally:
        # The import that runs this module expects an entry when it ends.
        if "sitecustomize" not in sys.modules and me is not None:
            sys.modules["sitecustomize"] = me


_memwatch_boot()
del _memwatch_boot
