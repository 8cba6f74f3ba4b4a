"""prometheus_client values whose file faults cost counts, never a request or a worker.

In multiprocess mode every metric value lives in a memory-mapped file of the process
(``MmapedDict``). Two faults of that storage hurt the app itself, not only its metrics:

- An ``OSError`` where a file is opened or grown (directory full, removed or unwritable) raises out of
  whatever created the metric: the app's import, or a request creating a new label set.
- ``MmapedDict`` sizes its files with ``truncate``, which makes them sparse: on a full tmpfs (``/dev/shm``
  is one) the first write into a page no one has touched yet is SIGBUS, which kills the worker on the spot
  (client_python has no guard for it; #1199 and #878 are its neighbours on the reading side).

:func:`guarded` wraps prometheus_client's value class (public API: the class that ``MultiProcessValue``
returns, installed as ``values.ValueClass``) so that a file is fully allocated (``posix_fallocate``, an
error we can catch) before ``MmapedDict`` maps or grows it, mirroring its sizing rule (start at 64 KiB,
double until the new entry fits), and so that any failure to open, allocate or decode a file leaves that
value in memory only: counted (``gunicorn_metrics_write_errors_total``), logged once per process, and the
caller goes on. Once a file is allocated, writes into it are plain memory stores that cannot fail.

Residual risk, documented in docs/reliability.md: a file shrunk or truncated behind a worker's back by
someone else is still SIGBUS; ``posix_fallocate`` on a filesystem without native support is emulated by
writing zeros (same outcome, slower).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import weakref
from typing import Any

from . import shared_state

# prometheus_client's MmapedDict: first size of a file, and the size of one entry for a key (a 4-byte
# length, the UTF-8 key padded to 8 bytes, a double value and a double timestamp). Mirrored here so a
# file is allocated before MmapedDict maps it, to exactly the size MmapedDict itself would give it.
_INITIAL_SIZE = 1 << 16
_USED = struct.Struct("i")
#: A new file is allocated under its name plus this (no reader lists it), then renamed into place.
TMP_SUFFIX = ".tmp"


def _entry_size(key: str) -> int:
    encoded = key.encode("utf-8")
    return 4 + len(encoded) + (8 - (len(encoded) + 4) % 8) + 16


def _file_prefix(typ: str, multiprocess_mode: str) -> str:
    return f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ


def allocate_for(path: str, key: str | None) -> None:
    """Make sure `path` exists, fully allocated, and (for `key`, if new) big enough. Raises OSError.

    A new file is allocated under a temporary name and renamed into place (one writer per file, so the
    name is fixed): a scrape never reads it empty (an unreadable file to prometheus_client's reader, a
    read error), and one that cannot be allocated (a full disk) leaves nothing behind. An all-zero file
    is an empty MmapedDict, to its writer and to its readers.
    """
    tmp: str | None = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        tmp = path + TMP_SUFFIX
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        used = 0
        if size >= _USED.size:
            used = _USED.unpack(os.pread(fd, _USED.size, 0))[0]
        target = size or _INITIAL_SIZE
        if key is not None and used > 0:
            # The same rule as MmapedDict._init_value: double the capacity until the new entry fits.
            # (A key already in the file needs no room; allocating for it anyway is harmless.)
            while used + _entry_size(key) > target:
                target *= 2
        os.posix_fallocate(fd, 0, target)  # backs every page now, or fails here with ENOSPC
        if tmp is not None:
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def guarded(base: type) -> Any:
    """A subclass of prometheus_client's multiprocess value class `base` that never raises or SIGBUSes."""

    class GuardedValue(base):
        _gunicorn_prometheus_guarded = True
        #: File prefixes values of this process use: a new identity's files are allocated up front.
        prefixes: set[str] = set()
        #: Every value, so that those of a prefix whose file cannot be allocated go memory-only at once.
        instances: weakref.WeakSet = weakref.WeakSet()

        def __init__(
            self,
            typ: str,
            metric_name: str,
            name: str,
            labelnames: Any,
            labelvalues: Any,
            help_text: str,
            multiprocess_mode: str = "",
            **kwargs: Any,
        ) -> None:
            self._memory_only = False
            self._mem_value, self._mem_timestamp = 0.0, 0.0
            prefix = self._prefix = _file_prefix(typ, multiprocess_mode)
            GuardedValue.prefixes.add(prefix)
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
            path = os.path.join(directory, f"{prefix}_{self._identity()}.db")
            key = json.dumps(
                [metric_name, name, dict(zip(labelnames, labelvalues, strict=False)), help_text],
                sort_keys=True,
            )
            try:
                allocate_for(path, key)
                super().__init__(
                    typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode, **kwargs
                )
            except Exception as err:  # OSError, or a corrupt file's decoding error: never the caller's
                self._fail(path, err)
            GuardedValue.instances.add(self)

        def _fail(self, path: str, err: BaseException) -> None:
            shared_state.record_write_error(path, err)
            self._memory_only = True

        @classmethod
        def memory_only(cls, prefix: str, path: str, err: BaseException) -> None:
            """Values of `prefix` stop using files: the file they would reopen could not be allocated."""
            shared_state.record_write_error(path, err)
            for value in list(cls.instances):
                if value._prefix == prefix:
                    value._memory_only = True

        @staticmethod
        def _identity() -> str:
            from .slots import current_identity

            return current_identity()

        # After an identity change prometheus_client reopens files inside these calls, which can raise
        # (a removed directory, a corrupt predecessor's file): the value then lives on in memory.
        def inc(self, amount: float) -> None:
            if not self._memory_only:
                try:
                    return super().inc(amount)
                except Exception as err:
                    self._fail(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), err)
            self._mem_value += amount

        def set(self, value: float, timestamp: float | None = None) -> None:
            if not self._memory_only:
                try:
                    return super().set(value, timestamp)
                except Exception as err:
                    self._fail(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), err)
            self._mem_value, self._mem_timestamp = value, timestamp or 0.0

        def get(self) -> float:
            if not self._memory_only:
                try:
                    return super().get()
                except Exception as err:
                    self._fail(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), err)
            return self._mem_value

        def set_exemplar(self, exemplar: Any) -> None:
            if not self._memory_only:
                with contextlib.suppress(Exception):
                    super().set_exemplar(exemplar)

        def get_exemplar(self) -> Any:
            return None if self._memory_only else super().get_exemplar()

    return GuardedValue


def allocate_identity(directory: str | os.PathLike[str], identity: str, value_class: Any) -> None:
    """Allocate this identity's files for the prefixes in use, before values switch to them.

    Values created before an identity change (a preloaded app's, in the master) reopen their files under
    the new identity inside prometheus_client, where no guard runs; allocating those files first means
    the reopening maps only backed pages. A failure is counted and logged; the worker goes on.
    """
    if not getattr(value_class, "_gunicorn_prometheus_guarded", False):
        return
    for prefix in sorted(value_class.prefixes):
        path = os.path.join(os.fspath(directory), f"{prefix}_{identity}.db")
        try:
            allocate_for(path, None)
        except OSError as err:
            value_class.memory_only(prefix, path, err)
