"""Sessions kept resident per shape, least recently used first out under a device-memory budget.

The GPU backend makes one ONNX Runtime session (and CUDA graph) per component and input shape, on weights shared
across them (weights.py). Once made they are kept, so changing the aspect ratio between requests costs nothing; a
budget (`--max-device-memory`) bounds what they hold. What a session holds is measured, not guessed: the device
memory in use before it was made and after its first runs (its arena and workspace grow during those), read with
`cudaMemGetInfo` — the GPU's memory in use, less what was in use when the backend started. Before a new session is
made, the least recently used ones are freed until the largest size measured for that component fits; after each
stage, until what is in use fits. A budget smaller than one call's working set still runs (each stage frees what
came before it) with a warning: the budget then bounds everything but the session in use.

A session's size grows with its shape's work (batch × latent pixels: activations), so the room made for a new one is
the component's most bytes per unit of work measured so far times the new shape's work: a server's first batch of
four at a size whose one-image sessions were measured asks for four times their room, not their size. Without
`--max-device-memory` the budget is automatic (AUTOMATIC_RESERVE): what was free on the GPU when the backend
started, less a reserve, so that sessions kept for every size and batch a server meets are freed before the GPU runs
out of memory instead of failing the calls that would need more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

log = logging.getLogger(__name__)
GIB = 2**30
# the automatic budget leaves this share of the GPU's memory (at least AUTOMATIC_RESERVE_MIN) to what it does not count
# ahead: a call's plain runs on any-shape sessions, allocator rounding and fragmentation
AUTOMATIC_RESERVE = 0.10
AUTOMATIC_RESERVE_MIN = 2 * GIB


def automatic_budget(in_use: int, total: int) -> int:
    """The budget (bytes) when none is given: the GPU's free memory at the backend's start (`total` less `in_use`,
    other processes' and this one's CUDA context) less the reserve; 0 where nothing is left (then every call frees
    what came before it, with the budget's warning)."""
    return max(0, total - in_use - max(AUTOMATIC_RESERVE_MIN, int(total * AUTOMATIC_RESERVE)))


@dataclass
class Entry:
    value: object
    component: str
    nbytes: int | None = None  # measured after its first runs (None until then)
    work: int | None = None  # its shape's work (batch × latent pixels), None for a session of any shape


class Resident:
    """Values (sessions) by key, with the component each belongs to; `used()` gives the bytes held now (all of them,
    weights included); `evict(key, value)` is called when one is let go, before it is dropped."""

    def __init__(self, used: Callable[[], int], budget: int | None = None,
                 evict: Callable[[Hashable, object], None] | None = None, automatic: bool = False):
        """`automatic`: the budget is automatic_budget's, not the user's (said so in its warning)."""
        self.used, self.budget, self._evict, self.automatic = used, budget, evict, automatic
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._pending: list[tuple[Hashable, int]] = []  # made, not yet measured: (key, bytes in use before)
        self._making: dict[Hashable, threading.Event] = {}  # keys being made now, set when done
        self._sizes: dict[str, int] = {}  # component → the largest size measured for one of its entries
        self._rates: dict[str, float] = {}  # component → the most bytes per unit of work measured for one of them
        self._warned = False
        self._lock = threading.RLock()  # values may be made on several threads at once (Pipeline.prepare)
        self.peak = 0  # most bytes in use seen at a measuring point
        self.evictions = 0  # values freed to keep the budget

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        return list(self._entries)

    def peek(self, key: Hashable):
        """The value kept under `key` (None if none), without counting it as used."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def get(self, key: Hashable, component: str, make: Callable[[], object], work: int | None = None):
        """The value kept under `key`, or a new one from `make()` (room made for it first: `expected`). `make` runs
        outside the lock: several threads may make values for different keys at once; a thread asking for a key
        another thread is making waits for that one (a prepared session is never made twice). `work`: the shape's
        work (batch × latent pixels), by which the room it needs is scaled."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return entry.value
                making = self._making.get(key)
                if making is None:
                    making = self._making[key] = threading.Event()
                    self._make_room(self.expected(component, work))
                    before = self.used()
                    break
            making.wait()  # then take what that thread made (or make it here, if it failed)
        try:
            started = time.perf_counter()
            value = make()
            log.info("made the session for %s in %.2f s", key, time.perf_counter() - started)
            with self._lock:
                self._entries[key] = Entry(value, component, work=work)
                self._pending.append((key, before))
            return value
        finally:
            with self._lock:
                del self._making[key]
            making.set()

    def settle(self) -> None:
        """Call when the work that first ran the newest values has finished (the stream synchronised): measures them,
        then frees the least recently used ones while more than the budget is in use."""
        with self._lock:
            self._settle()

    def _settle(self) -> None:
        now = self.used()
        self.peak = max(self.peak, now)
        if self._pending:
            share = max(0, now - min(before for _, before in self._pending)) // len(self._pending)
            for key, _ in self._pending:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.nbytes = share
                    self._sizes[entry.component] = max(self._sizes.get(entry.component, 0), share)
                    if entry.work:
                        self._rates[entry.component] = max(self._rates.get(entry.component, 0.0), share / entry.work)
            self._pending.clear()
        self._make_room(0, keep=1)

    def expected(self, component: str, work: int | None = None) -> int:
        """The bytes a new value of `component` is expected to hold: the most bytes per unit of work measured for the
        component times `work`, where both are known; else the most bytes measured for one of its values (0 before
        any is measured)."""
        rate = self._rates.get(component)
        if work and rate:
            return int(rate * work)
        return self._sizes.get(component, 0)

    def fits(self, wanted) -> bool:
        """Whether the values of `wanted` ((key, component, work) each) that are not kept yet are expected (`expected`)
        to fit the budget beside what is in use now (a component never measured counts 0)."""
        if self.budget is None:
            return True
        with self._lock:
            need = sum(self.expected(component, work) for key, component, work in wanted if key not in self._entries)
            return self.used() + need <= self.budget

    def _make_room(self, needed: int, keep: int = 0) -> None:
        """Free least recently used values until `needed` more bytes fit the budget, keeping the `keep` newest."""
        if self.budget is None:
            return
        while self.used() + needed > self.budget and len(self._entries) > keep:
            self.pop(next(iter(self._entries)))
            self.evictions += 1
        if self.used() + needed > self.budget and not self._warned:
            self._warned = True
            budget = (f"the automatic device-memory budget ({self.budget / GIB:.1f} GiB: the GPU's free memory at the "
                      "start less a reserve)") if self.automatic else f"--max-device-memory {self.budget / GIB:.1f} GiB"
            log.warning("%s: %.1f GiB are in use with nothing left to free (shared weights and the session in use); "
                        "running over the budget", budget, (self.used() + needed) / GIB)

    def pop(self, key: Hashable) -> None:
        """Let one value go (its memory is freed once nothing else refers to it)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            self._pending = [(k, b) for k, b in self._pending if k != key]
        if self._evict is not None:
            self._evict(key, entry.value)
        log.info("freed the session for %s (%s)", key, f"{entry.nbytes / GIB:.2f} GiB" if entry.nbytes else "size not measured")

    def pop_component(self, component: str) -> None:
        for key in [k for k, e in self._entries.items() if e.component == component]:
            self.pop(key)

    def clear(self) -> None:
        for key in list(self._entries):
            self.pop(key)

    def sizes(self) -> dict[Hashable, int | None]:
        """Each kept value's measured bytes, least recently used first."""
        return {key: entry.nbytes for key, entry in self._entries.items()}
