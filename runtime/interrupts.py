"""Ctrl-C and SIGTERM during long native calls.

Python runs signal handlers in the main thread between bytecodes. A native call that runs for minutes without
returning to Python (TensorRT's engine builder) therefore never sees the interrupt; worse, when it calls back into
Python (a progress monitor), the KeyboardInterrupt raised there is swallowed by the binding and the call goes on.
`run_native` moves such a call to a worker thread and keeps the main thread waiting in Python, where the interrupt
arrives at once: it asks the call to stop (`cancel`), gives it a moment, and raises KeyboardInterrupt so that every
`finally` (temporaries removed, locks released) runs as usual. A call that has not stopped by then is left behind;
the CLI then ends the process without running interpreter shutdown under the still-running native code
(`abandoned`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
GRACE_S = 2.0  # how long a cancelled call may take to return before it is left behind

_abandoned: list[threading.Event] = []  # the "done" events of calls left behind


def run_native(call: Callable[[], T], cancel: Callable[[], None] | None = None, name: str = "native call") -> T:
    """`call()` in a worker thread; Ctrl-C / SIGTERM in the main thread cancel it and raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        return call()  # signals are delivered to the main thread only: nothing to gain
    outcome: dict = {}
    done = threading.Event()  # waited on, not Thread.join: a join that an interrupt cuts short can leave the
    # thread marked as finished while it still runs (CPython gh-90882)

    def work():
        try:
            outcome["value"] = call()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=name, daemon=True).start()
    try:
        while not done.wait(0.1):  # short waits: the signal handler runs between them
            pass
    except KeyboardInterrupt:
        if cancel is not None:
            cancel()
        if not done.wait(GRACE_S):
            _abandoned.append(done)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def abandoned() -> bool:
    """Whether a cancelled native call is still running (the process should end without interpreter shutdown)."""
    return not all(done.is_set() for done in _abandoned)
