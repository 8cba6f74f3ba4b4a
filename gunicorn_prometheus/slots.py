"""Stable worker slots: name each worker's prometheus_client files by slot, not by pid.

prometheus_client's multiprocess mode names every process's files by pid, so every worker that ever lived
leaves a counter/histogram file behind that each scrape must read forever (deleting it would make counters
go backwards). Here the Gunicorn master hands each new worker the lowest free *slot* and the worker writes
``counter_w<slot>.db`` etc. A replacement worker opens its predecessor's files and continues its values
(``MmapedValue`` reads the stored value of every key when it (re)opens a file), so counters stay exact and
monotonic while the number of files is bounded by the most workers alive at once.

Master side: :class:`SlotTable` (pure bookkeeping) plus :func:`clear_slot_live_gauges` when a holder is
reaped. Worker side: :func:`install_identity` (once, in the master, before forking and before the app's
metrics exist) and :func:`set_identity` right after fork.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Hashable

from prometheus_client import multiprocess, values

from . import cells, metric_files
from .shared_state import slot_name

MASTER_IDENTITY = "master"

# prometheus_client names files ``<prefix>_<identity>.db`` and its collector splits the name on "_" to
# recover the identity (the ``pid`` label of ``all`` gauges), so an identity must not contain "_" or a
# path separator. Keep it to a conservative, filename-safe alphabet.
_IDENTITY_RE = re.compile(r"[A-Za-z0-9.-]+")

# (pid that set it, identity). Bound to the pid so a process forked from one that set an identity (e.g. a
# worker forked from the master before its post_fork hook ran, or a subprocess the app forks) falls back
# to its own pid instead of writing into its parent's files: MultiProcessValue requires that
# simultaneously running processes get distinct identifiers.
_identity: tuple[int, str] | None = None


class SlotTable:
    """Which worker slots are held, master side. Pure bookkeeping, no I/O.

    Invariant: a slot is released only once its previous holder process has been *reaped* (gunicorn's
    ``child_exit`` hook, which runs in the master even after SIGKILL/OOM kill). Until then the slot stays
    held, so no two live processes ever write the same slot's files -- this is what makes sharing files
    between successive workers safe. During a graceful reload old and new workers overlap, so the new ones
    simply get other (higher) slots until the old ones are reaped.
    """

    def __init__(self) -> None:
        self._holders: dict[int, Hashable] = {}

    def acquire(self, holder: Hashable) -> int:
        """Give ``holder`` (a pid, worker object or any token) the lowest free slot and return it.

        The lowest free slot keeps the set of slot numbers -- hence of files -- as small as the most
        workers that were ever held at once.
        """
        slot = 0
        while slot in self._holders:
            slot += 1
        self._holders[slot] = holder
        return slot

    def release(self, slot: int) -> bool:
        """Free ``slot``; call only after its holder was reaped. Returns False if it was not held.

        Not raising on an unknown slot keeps the master's reaping hook from crashing the arbiter on a
        double release (gunicorn may report one exit through both ``child_exit`` and ``worker_exit``).
        """
        return self._holders.pop(slot, None) is not None

    def holder(self, slot: int) -> Hashable | None:
        """Return the token that holds ``slot``, or None if it is free."""
        return self._holders.get(slot)

    def slot_of(self, holder: Hashable) -> int | None:
        """Return the slot held by ``holder``, or None (linear: tables are as small as the worker count)."""
        for slot, token in self._holders.items():
            if token == holder:
                return slot
        return None

    @property
    def held(self) -> frozenset[int]:
        """Slots currently held (by live or not-yet-reaped workers)."""
        return frozenset(self._holders)

    def __len__(self) -> int:
        return len(self._holders)

    def __contains__(self, slot: object) -> bool:
        return slot in self._holders


def slot_identity(slot: int) -> str:
    """File identity of a slot: ``"w<slot>"`` (also the ``pid`` label value of ``all``-mode gauges)."""
    return slot_name(slot)


def set_identity(name: str) -> None:
    """Make this process write its metric files as ``name`` (call in the worker right after fork).

    Values created earlier in this process (e.g. by a preloaded app in the master) notice the change on
    their next use and reopen the files of the new identity, reading back the values stored there.
    """
    global _identity
    if not _IDENTITY_RE.fullmatch(name):
        raise ValueError(f"invalid identity {name!r}: use letters, digits, '.' or '-' (no '_')")
    _identity = (os.getpid(), name)
    if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metric_files.allocate_identity(directory, name, values.ValueClass)


def current_identity() -> str:
    """This process's file identity: the one it set, else ``str(os.getpid())`` like prometheus_client."""
    ident = _identity
    pid = os.getpid()
    if ident is not None and ident[0] == pid:
        return ident[1]
    return str(pid)


def install_identity() -> type:
    """Make prometheus_client name multiprocess files by :func:`current_identity`. Idempotent.

    Must run in the master before it forks workers and before the application creates its metrics:
    metric objects keep the value class that was current when they were created, and objects created
    from prometheus_client's default class would keep writing pid-named files. Returns the value class.
    """
    current = values.ValueClass
    if getattr(current, "_gunicorn_prometheus_identity", False):
        return current
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Without a directory every MmapedValue would fail on creation; fail here, loudly and early.
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set before install_identity()")
    if _app_metrics_registered():
        warnings.warn(
            "metrics were created before install_identity(); they keep pid-named files",
            RuntimeWarning,
            stacklevel=2,
        )
    cls = metric_files.guarded(values.MultiProcessValue(process_identifier=current_identity))
    cls._gunicorn_prometheus_identity = True
    values.ValueClass = cls
    return cls


def _app_metrics_registered() -> bool:
    """Best-effort: did someone register metrics (other than the default collectors) in REGISTRY yet?"""
    from prometheus_client import REGISTRY

    default = ("process", "python_gc", "python_info")
    return any(not family.name.startswith(default) for family in REGISTRY.collect())


def clear_slot_live_gauges(directory: str | os.PathLike[str], slot: int, cells_fd: int | None = None) -> None:
    """Remove the ``gauge_live*_w<slot>.db`` files of a reaped slot holder.

    Call in the master after the holder was reaped and before the slot is handed out again, so ``live*``
    gauges stop counting the dead worker and its successor starts them from zero. Counter, histogram,
    summary and non-live gauge files are kept on purpose: the successor continues them. ``cells_fd``: the
    slot's HTTP cells file as the master holds it, whose in-progress gauge is reset whatever its path.
    """
    multiprocess.mark_process_dead(slot_identity(slot), os.fspath(directory))
    if cells_fd is not None:
        cells.reset_in_progress_fd(cells_fd)
    else:
        cells.reset_in_progress(os.fspath(directory), slot_identity(slot))  # the HTTP in-progress gauge too
