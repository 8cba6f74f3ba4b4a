"""Accept queues of real listening sockets, read as the metrics server reads the master's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_prometheus import listen_backlog, names


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def listen(opened: list[socket.socket], family: int, host: str, backlog: int) -> tuple[str, int]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    opened.append(sock)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock.getsockname()[:2]


def connect(opened: list[socket.socket], address: tuple[str, int], count: int) -> None:
    for _ in range(count):
        opened.append(socket.create_connection(address, timeout=5))


def test_queue_length_and_limit_of_each_listener(sockets: list[socket.socket]) -> None:
    v4 = listen(sockets, socket.AF_INET, "127.0.0.1", 7)
    v6 = listen(sockets, socket.AF_INET6, "::1", 5)
    idle = listen(sockets, socket.AF_INET, "127.0.0.1", 3)
    connect(sockets, v4, 3)  # never accepted: they wait in the kernel's queue
    connect(sockets, v6, 1)

    found = {x.address: x for x in listen_backlog.listeners(os.getpid())}

    assert found[f"127.0.0.1:{v4[1]}"] == listen_backlog.Listener(f"127.0.0.1:{v4[1]}", 3, 7)
    assert found[f"[::1]:{v6[1]}"] == listen_backlog.Listener(f"[::1]:{v6[1]}", 1, 5)
    assert found[f"127.0.0.1:{idle[1]}"].queued == 0
    # Connected client sockets and accepted ones are not listeners.
    assert len(found) == 3


def test_the_limit_is_the_kernels_cap(sockets: list[socket.socket]) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    address = listen(sockets, socket.AF_INET, "127.0.0.1", somaxconn + 1000)
    (found,) = listen_backlog.listeners(os.getpid())
    assert found.address == f"127.0.0.1:{address[1]}"
    assert found.limit == somaxconn


def test_only_the_given_process_sockets_count(sockets: list[socket.socket]) -> None:
    listen(sockets, socket.AF_INET, "127.0.0.1", 7)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert listen_backlog.listeners(child.pid) == []
    finally:
        child.kill()
        child.wait()
    assert listen_backlog.listeners(child.pid) == []  # gone: nothing, no error


def test_proc_fallback_reads_the_same_queue_lengths(sockets: list[socket.socket]) -> None:
    v4 = listen(sockets, socket.AF_INET, "127.0.0.1", 7)
    v6 = listen(sockets, socket.AF_INET6, "::1", 5)
    connect(sockets, v4, 2)
    connect(sockets, v6, 4)
    mine = listen_backlog.socket_inodes(os.getpid())
    found = {
        x.address: x for inode, x in listen_backlog._proc_listeners(os.getpid(), "/proc") if inode in mine
    }
    assert found == {
        f"127.0.0.1:{v4[1]}": listen_backlog.Listener(f"127.0.0.1:{v4[1]}", 2, None),
        f"[::1]:{v6[1]}": listen_backlog.Listener(f"[::1]:{v6[1]}", 4, None),
    }


def test_families(sockets: list[socket.socket]) -> None:
    address = listen(sockets, socket.AF_INET, "127.0.0.1", 9)
    connect(sockets, address, 2)
    queued, limit = listen_backlog.families(os.getpid())
    label = {"listener": f"127.0.0.1:{address[1]}"}
    assert (queued.name, limit.name) == (names.LISTEN_BACKLOG, names.LISTEN_BACKLOG_LIMIT)
    assert [(s.labels, s.value) for s in queued.samples] == [(label, 2)]
    assert [(s.labels, s.value) for s in limit.samples] == [(label, 9)]


def test_unix_sockets_are_listeners_too(sockets: list[socket.socket], tmp_path: Path) -> None:
    """BIND=unix:... (behind a proxy on the same host): the same two figures, from unix_diag."""
    path = str(tmp_path / "app.sock")
    abstract = f"gp-test-{os.getpid()}"
    for name, backlog in ((path, 6), ("\0" + abstract, 4)):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.bind(name)
        sock.listen(backlog)
    for _ in range(2):  # never accepted
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets.append(client)
        client.connect(path)

    found = {x.address: x for x in listen_backlog.listeners(os.getpid())}

    assert found == {
        f"unix:{path}": listen_backlog.Listener(f"unix:{path}", 2, 6),
        f"unix:@{abstract}": listen_backlog.Listener(f"unix:@{abstract}", 0, 4),
    }
