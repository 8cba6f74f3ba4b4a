"""The metrics side's processes: two peers that serve the metrics socket and keep each other alive.

The Gunicorn master must stay single-threaded (it forks workers) and must never wait on a scrape, so the
metrics server runs in processes of its own. The master binds the metrics socket itself (so a taken port
fails the start in one line), spawns the first peer with a fresh interpreter (no fork: nothing of the
master is inherited but that socket and a pidfd of the master), and keeps its own copy for a restart
(see below; workers close theirs as they fork). The first peer forks the second as soon as its imports
are done, before it has a thread or an event loop (one interpreter start-up, not two, competing with the
workers' boot); from then on both
serve the same listening socket (the kernel hands each connection to one of them) and each watches the
other and the master through pidfds. A replacement for a peer that died is a fresh interpreter again: the
survivor has threads and a running loop by then, which a fork must not copy.

Why peers and not a supervisor with a server below it: Gunicorn's master reaps every child it did not
fork as a worker without telling anyone ("Reaped unknown child process" in arbiter.reap_workers) and has
no periodic hook, so it cannot restart anything; a supervisor is then a single point of failure (kill -9
of it left the port closed for good). With two peers, killing either one leaves the other answering
without a gap (the listening socket never closes), and the survivor starts a replacement at once. A
pidfd works for any process, not only for children, so it does not matter who ended up whose parent.
Both leave as soon as the master is gone, so nothing of the metrics side outlives it.

What the peers cannot cover is every peer gone at once: both killed together (`kill -9` of both, the OOM
killer), or the survivor killed while it waits out the back-off of a replacement that died young. Then
nothing was left to start another, and the port stayed closed for good, silently. So the master keeps
what a start needs (its copy of the listening socket, the shared table's descriptor) and learns, without
a loop or a thread of its own, when no peer is left: every peer holds the write end of a pipe (the
"lifeline") whose read end only the master has, with O_ASYNC, so the kernel sends the master SIGIO when
the last write end closes, i.e. when the last peer has exited however it ended. The master's handler then
starts a new pair the way the first was started, at once, or after a back-off (SIGALRM) if the last pair
lived less than STABLE_AFTER; one log line either way. The listening socket never closes meanwhile: a
connection made in the gap waits in its backlog. Workers close the master's copies when they fork
(`release_in_worker`), so none of them holds the port or gets these signals.

Command lines must not contain "gunicorn" (upstream's harness counts those `ps` rows as master and
workers), so everything is handed over through the environment and inherited file descriptors, and the
processes are named `prometheus-metrics-server` (their argv[0]).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .multiproc_dir import state_dir
from .shared_state import table_path

if TYPE_CHECKING:
    import asyncio

PROCESS_NAME = "prometheus-metrics-server"
SERVER_MODULE = "gunicorn_prometheus.metrics_server"

# What a peer inherits, all through the environment (never the command line, see above).
ENV_MODULE = "PROMETHEUS_METRICS_MODULE"
ENV_SITE = "PROMETHEUS_METRICS_SITE"
ENV_PYTHON = "PROMETHEUS_METRICS_PYTHON"
ENV_LISTEN_FD = "PROMETHEUS_METRICS_LISTEN_FD"
ENV_MASTER_PID = "PROMETHEUS_METRICS_MASTER_PID"
ENV_MASTER_PIDFD = "PROMETHEUS_METRICS_MASTER_PIDFD"
ENV_PEER_PID = "PROMETHEUS_METRICS_PEER_PID"
ENV_PEER_PIDFD = "PROMETHEUS_METRICS_PEER_PIDFD"
ENV_TABLE_FD = "PROMETHEUS_METRICS_TABLE_FD"  # the shared state table's file (see shared_state.adopt_table)
ENV_LIFELINE_FD = "PROMETHEUS_METRICS_LIFELINE_FD"  # the lifeline's write end, kept open for life
_HANDOFF = (
    ENV_LISTEN_FD,
    ENV_MASTER_PID,
    ENV_MASTER_PIDFD,
    ENV_PEER_PID,
    ENV_PEER_PIDFD,
    ENV_TABLE_FD,
    ENV_LIFELINE_FD,
)

# argv[0] is the process name, so the interpreter cannot find its installation from it: PYTHONHOME
# (set for the child only) locates the standard library, -S skips the automatic site-packages, and this
# adds exactly the parent's site directories (with their .pth files, e.g. an editable install).
_BOOTSTRAP = (
    f"import os,runpy,site;[site.addsitedir(d) for d in os.environ[{ENV_SITE!r}].split(os.pathsep) if d];"
    f"runpy.run_module(os.environ.pop({ENV_MODULE!r}),run_name='__main__',alter_sys=True)"
)
STOPPING_MARKER = "metrics-stopping"
# A peer that lived this long is replaced at once; one that dies sooner (a crash at start-up, most
# likely) is replaced after a delay that doubles up to MAX_RESTART_DELAY.
STABLE_AFTER = 1.0
MAX_RESTART_DELAY = 4.0


def log(message: str) -> None:
    print(f"[gunicorn-prometheus] {message}", file=sys.stderr, flush=True)


def bind_metrics_socket(host: str, port: int) -> socket.socket:
    """Bind and listen in the master; OSError here means the metrics port is unusable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _site_dirs() -> str:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return os.pathsep.join(d for d in dirs if os.path.isdir(d))


def spawn_peer(
    *,
    listen_fd: int,
    master_pid: int,
    master_pidfd: int,
    own_pidfd: int | None,
    table_fd: int | None,
    lifeline_fd: int | None,
) -> subprocess.Popen:
    """Start one peer on the listening socket; `own_pidfd` lets the new peer watch the one spawning it."""
    python = os.environ.get(ENV_PYTHON) or sys.executable
    env = {k: v for k, v in os.environ.items() if k not in _HANDOFF}
    env.update(
        {
            ENV_MODULE: SERVER_MODULE,
            ENV_SITE: os.environ.get(ENV_SITE) or _site_dirs(),
            ENV_PYTHON: python,
            "PYTHONHOME": os.pathsep.join(dict.fromkeys((sys.base_prefix, sys.base_exec_prefix))),
            ENV_LISTEN_FD: str(listen_fd),
            ENV_MASTER_PID: str(master_pid),
            ENV_MASTER_PIDFD: str(master_pidfd),
        }
    )
    fds = [listen_fd, master_pidfd]
    if own_pidfd is not None:
        env[ENV_PEER_PID] = str(os.getpid())
        env[ENV_PEER_PIDFD] = str(own_pidfd)
        fds.append(own_pidfd)
    if table_fd is not None:
        env[ENV_TABLE_FD] = str(table_fd)
        fds.append(table_fd)
    if lifeline_fd is not None:
        env[ENV_LIFELINE_FD] = str(lifeline_fd)
        fds.append(lifeline_fd)
    return subprocess.Popen(
        [PROCESS_NAME, "-S", "-c", _BOOTSTRAP],
        executable=python,
        env=env,
        pass_fds=tuple(fds),
        stdin=subprocess.DEVNULL,
    )


# --- the master's side: start, restart when no peer is left, stop ----------------------------------


@dataclass
class MetricsSide:
    """What the master keeps: the current first peer (whose pid is the peers' process group) and what it
    takes to start a new pair (see the module docstring)."""

    first: subprocess.Popen | None
    directory: str
    listener: socket.socket | None = None
    table_fd: int | None = None
    master_pid: int = 0
    lifeline: int | None = None  # the read end; None while a new pair is due
    started: float = 0.0  # when the current pair was started (monotonic)
    delay: float = 0.0  # the last back-off
    due: bool = False  # a new pair waits for the timer (SIGALRM)
    stopping: bool = False
    alarmed: bool = False  # SIGALRM came (not handled yet)
    busy: bool = False  # in the signal handler (see _on_signal)
    again: bool = False  # a signal came meanwhile

    @property
    def pid(self) -> int:
        return self.first.pid if self.first is not None else 0


# The side the master's SIGIO/SIGALRM handler looks after, and the dispositions it replaced (restored in
# each worker).
_supervised: MetricsSide | None = None
_replaced_handlers: dict[int, object] = {}


def start(sock: socket.socket, *, master_pid: int, directory: str) -> MetricsSide:
    """Spawn the first peer with the listening socket, which the returned side owns from now on (the
    master's copy, for a new pair; `stop` closes it)."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir(directory) / STOPPING_MARKER).unlink()
    try:
        table_fd: int | None = os.open(table_path(directory), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        table_fd = None  # the peers then open it by path
    side = MetricsSide(None, directory, sock, table_fd, master_pid)
    try:
        _supervise(side)
        _start_pair(side)
    except BaseException:
        _release(side)
        raise
    return side


def _supervise(side: MetricsSide) -> None:
    global _supervised
    for signum in (signal.SIGIO, signal.SIGALRM):
        previous = signal.signal(signum, _on_signal)
        if previous is not _on_signal:
            _replaced_handlers[signum] = previous
    _supervised = side


def _start_pair(side: MetricsSide) -> None:
    """Spawn a first peer (it forks the second) holding the write end of a new lifeline.

    O_ASYNC is set while this process still holds a write end, so however soon the pair dies, closing
    ours (the last line) or the peers' exit afterwards raises SIGIO.
    """
    assert side.listener is not None
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(read_end, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(
            read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK
        )
        master_pidfd = os.pidfd_open(side.master_pid)
        try:
            first = spawn_peer(
                listen_fd=side.listener.fileno(),
                master_pid=side.master_pid,
                master_pidfd=master_pidfd,
                own_pidfd=None,
                table_fd=side.table_fd,
                lifeline_fd=write_end,
            )
        finally:
            os.close(master_pidfd)
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if side.lifeline is not None:
        os.close(side.lifeline)
    side.first, side.lifeline, side.started = first, read_end, time.monotonic()
    os.close(write_end)


def _on_signal(signum: int, frame: object) -> None:
    """SIGIO (maybe the lifeline's end) or SIGALRM (a new pair due): never raises, never blocks for long.

    Python runs it in the main thread between two bytecodes of whatever the master was doing, so it
    writes its log line with os.write (print could find stderr's buffer in use) and a signal arriving
    while it runs (a new pair dying at once) is handled after it, not inside it.
    """
    side = _supervised
    if side is None or side.stopping or os.getpid() != side.master_pid:
        return
    side.alarmed |= signum == signal.SIGALRM
    side.again = True
    if side.busy:
        return
    side.busy = True
    try:
        while side.again:
            side.again = False
            _check(side)
    except Exception as err:  # metrics faults never hurt the app: say so, and try again later
        _log_raw(f"metrics server supervision failed: {err!r}")
        if side.lifeline is None and not side.due:
            _due_in(side, MAX_RESTART_DELAY)
    finally:
        side.busy = False


def _check(side: MetricsSide) -> None:
    alarmed, side.alarmed = side.alarmed, False
    if side.due:
        if alarmed:
            side.due = False
            _try_start_pair(side)
        return
    if side.lifeline is None or not _ended(side.lifeline):
        return
    os.close(side.lifeline)
    side.lifeline = None
    lived = time.monotonic() - side.started
    side.delay = 0.0 if lived >= STABLE_AFTER else min(max(0.25, side.delay * 2), MAX_RESTART_DELAY)
    when = f" in {side.delay:g} s" if side.delay else ""
    _log_raw(f"no metrics server peer is left; starting a new pair{when}")
    if side.delay:
        _due_in(side, side.delay)
    else:
        _try_start_pair(side)


def _ended(lifeline: int) -> bool:
    """Whether every write end of the lifeline is closed (no peer left): a read then finds end of file."""
    try:
        return os.read(lifeline, 1) == b""
    except BlockingIOError:
        return False


def _try_start_pair(side: MetricsSide) -> None:
    try:
        _start_pair(side)
    except OSError as err:  # out of processes or memory, say: try again later
        _log_raw(f"cannot start the metrics server: {err}; retrying in {MAX_RESTART_DELAY:g} s")
        _due_in(side, MAX_RESTART_DELAY)


def _due_in(side: MetricsSide, seconds: float) -> None:
    side.due = True
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _log_raw(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"[gunicorn-prometheus] {message}\n".encode())


def _release(side: MetricsSide) -> None:
    """Stop supervising `side` and close the master's copies (listening socket, table, lifeline)."""
    global _supervised
    side.stopping = True
    if _supervised is side:
        _supervised = None
        if side.due:
            signal.setitimer(signal.ITIMER_REAL, 0)
    side.due = False
    _close_copies(side)


def release_in_worker(side: MetricsSide | None) -> None:
    """In a process the master forked (a worker): drop the master's copies and signal handlers.

    A worker holding the listening socket would keep the metrics port bound (with nobody answering) for as
    long as it lived, and a process it forked, after the master is gone.
    """
    global _supervised
    _supervised = None
    for signum, previous in _replaced_handlers.items():
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(signum, previous)  # type: ignore[arg-type]
    if side is not None:
        side.stopping = True
        _close_copies(side)


def _close_copies(side: MetricsSide) -> None:
    for fd in (side.table_fd, side.lifeline):
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    side.table_fd = side.lifeline = None
    if side.listener is not None:
        side.listener.close()
        side.listener = None


def _group_running(group: int) -> bool:
    """Whether a process of `group` still runs; a zombie (exited, not reaped yet) does not.

    `killpg(group, 0)` also succeeds while a member is a zombie, and the second peer becomes one when it
    exits: it is the first peer's child, so once the first is gone it is reparented to PID 1 (in the
    image, the master itself) or a subreaper, which reaps it only when it gets round to it. Counting it
    made every stop wait for the whole timeout (2 s, measured). So the members are read from /proc
    (Linux, as pidfds already are), and zombies that are ours to reap (an orphaned peer, when the master
    is PID 1) are reaped on the way.
    """
    try:
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:  # no /proc: the signal test, zombies included
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    me = os.getpid()
    for name in entries:
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                # pid (comm) state ppid pgrp ...: comm may hold spaces or ")", so split after the last ")"
                state, ppid, pgrp = stat.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if int(pgrp) != group:
            continue
        if state != b"Z":
            return True
        if int(ppid) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(name), os.WNOHANG)
    return False


def stop(side: MetricsSide, timeout: float = 2.0) -> None:
    """Stop every peer (they share the first one's process group) and wait, bounded, until they are gone;
    then close the master's copies, which frees the port.

    The marker file tells a peer that sees its partner end not to replace it, and the master no longer
    starts a new pair once it stops supervising.
    """
    side.stopping = True  # first: the peers' exit ends the lifeline, which must not start a new pair
    try:
        _stop_peers(side, timeout)
    finally:
        _release(side)


def _stop_peers(side: MetricsSide, timeout: float) -> None:
    with contextlib.suppress(OSError):
        (state_dir(side.directory) / STOPPING_MARKER).touch()
    if side.first is None:
        return
    group = side.first.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGTERM)
    if side.first.poll() is None:
        side.first.terminate()  # it may not have made its own group yet
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        side.first.poll()  # our child: reaped here (or by Gunicorn's own waitpid loop)
        if not _group_running(group):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    if side.first.poll() is None:
        side.first.kill()
        side.first.wait()


# --- a peer's side: the hand-off, and watching the master and the other peer ---------------------------


@dataclass(frozen=True)
class Handoff:
    """What a peer received from whoever spawned it."""

    listen_fd: int
    master_pid: int
    master_pidfd: int
    peer_pid: int | None
    peer_pidfd: int | None
    table_fd: int | None = None
    lifeline_fd: int | None = None  # held, never used: the master learns from its closing (see above)

    @classmethod
    def from_environ(cls) -> Handoff:
        env = os.environ
        env.pop("PYTHONHOME", None)  # set for the bootstrap only (see spawn_peer)
        peer = env.pop(ENV_PEER_PID, None)
        peer_fd = env.pop(ENV_PEER_PIDFD, None)
        table_fd = env.pop(ENV_TABLE_FD, None)
        lifeline_fd = env.pop(ENV_LIFELINE_FD, None)
        return cls(
            listen_fd=int(env.pop(ENV_LISTEN_FD)),
            master_pid=int(env.pop(ENV_MASTER_PID)),
            master_pidfd=int(env.pop(ENV_MASTER_PIDFD)),
            peer_pid=int(peer) if peer else None,
            peer_pidfd=int(peer_fd) if peer_fd else None,
            table_fd=int(table_fd) if table_fd else None,
            lifeline_fd=int(lifeline_fd) if lifeline_fd else None,
        )


def fork_second_peer(handoff: Handoff) -> tuple[Handoff, int | None]:
    """In the first peer, before any thread or event loop exists: fork the second one.

    Returns the handoff this process goes on with (now naming its partner) and, in the first peer, the
    pid of the child it must reap. The child leaves the master's process group behind as the first peer
    did (the group is the first peer's, made before this fork), so stopping the group stops both.
    """
    own_pidfd = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        return replace(handoff, peer_pid=os.getppid(), peer_pidfd=own_pidfd), None
    os.close(own_pidfd)
    return replace(handoff, peer_pid=pid, peer_pidfd=os.pidfd_open(pid)), pid


def _reaper(pid: int) -> Callable[[], int]:
    return lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _start_time(pid: int) -> float:
    import psutil  # the peers' only use of it here; the master imports this module without it

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class PeerKeeper:
    """In a peer's event loop: leave when the master is gone, replace the other peer when it ends."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handoff: Handoff,
        directory: str,
        on_master_gone: Callable,
        *,
        peer_child: int | None = None,
    ) -> None:
        self.loop = loop
        self.handoff = handoff
        self.stopping_marker = Path(state_dir(directory)) / STOPPING_MARKER
        self.on_master_gone = on_master_gone
        self.stopping = False
        self.own_pidfd = os.pidfd_open(os.getpid())
        self.peer_pid: int | None = None
        self.peer_pidfd: int | None = None
        # How to reap the current peer when it is our own child (the forked second peer, a spawned one)
        self.reap_peer: Callable[[], int] | None = None if peer_child is None else _reaper(peer_child)
        self.peer_started = 0.0
        self.delay = 0.0
        self.restarts = 0

    def start(self) -> None:
        self.loop.add_reader(self.handoff.master_pidfd, self._master_gone)
        if self.handoff.peer_pidfd is None:
            self._spawn()  # no partner yet (the fork failed): a fresh one
        else:
            assert self.handoff.peer_pid is not None
            started = time.time() if self.reap_peer is not None else _start_time(self.handoff.peer_pid)
            self._watch(self.handoff.peer_pid, self.handoff.peer_pidfd, started)

    def stop(self) -> None:
        """No more replacements (SIGTERM or the master gone)."""
        self.stopping = True

    def _master_gone(self) -> None:
        self.loop.remove_reader(self.handoff.master_pidfd)
        self.stopping = True
        self.on_master_gone()

    def _watch(self, pid: int, pidfd: int, started: float) -> None:
        self.peer_pid, self.peer_pidfd, self.peer_started = pid, pidfd, started
        self.loop.add_reader(pidfd, self._peer_gone)

    def _peer_gone(self) -> None:
        assert self.peer_pidfd is not None
        self.loop.remove_reader(self.peer_pidfd)
        os.close(self.peer_pidfd)
        self.peer_pidfd = None
        code = self.reap_peer() if self.reap_peer is not None else None
        self.reap_peer = None
        if self._stopping():
            return
        lived = time.time() - self.peer_started if self.peer_started else STABLE_AFTER
        self.delay = 0.0 if lived >= STABLE_AFTER else min(max(0.25, self.delay * 2), MAX_RESTART_DELAY)
        log(
            f"metrics server peer (pid {self.peer_pid}) {_describe_exit(code)}; "
            f"starting a replacement{f' in {self.delay:g} s' if self.delay else ''}"
        )
        self.loop.call_later(self.delay, self._spawn)

    def _stopping(self) -> bool:
        return self.stopping or self.stopping_marker.exists()

    def _spawn(self) -> None:
        if self._stopping():
            return
        try:
            child = spawn_peer(
                listen_fd=self.handoff.listen_fd,
                master_pid=self.handoff.master_pid,
                master_pidfd=self.handoff.master_pidfd,
                own_pidfd=self.own_pidfd,
                table_fd=self.handoff.table_fd,
                lifeline_fd=self.handoff.lifeline_fd,
            )
        except OSError as err:  # e.g. out of processes or memory: try again later
            log(f"cannot start a metrics server peer: {err}; retrying in {MAX_RESTART_DELAY:g} s")
            self.loop.call_later(MAX_RESTART_DELAY, self._spawn)
            return
        self.reap_peer = child.wait
        self.restarts += 1
        self._watch(child.pid, os.pidfd_open(child.pid), time.time())
