"""The listen backlog: connections the kernel accepted that no worker has accepted yet, read at scrape time.

When every worker is busy (a blocked event loop, a full thread pool, a CPU-bound route), new connections
wait in the kernel's accept queue of Gunicorn's listening socket, invisible to every request metric
until they time out. For a socket in LISTEN state Linux keeps that queue's length and its limit
(``sk_ack_backlog`` and ``sk_max_ack_backlog``: Gunicorn's ``backlog``, capped by ``net.core.somaxconn``).

How they are read, by the metrics server and without any help from the master or the workers:

- which sockets: the master's, by their inodes in ``/proc/<master>/fd`` (no descriptor is passed around);
- both figures: a ``sock_diag`` netlink dump of the TCP sockets in LISTEN state, what ``ss -lt`` does.
  The kernel filters by state, so a scrape reads one record per listening socket whatever the number of
  open connections. ``TCP_INFO`` reports the same but needs the socket itself; ``/proc/net/tcp`` has
  the queue length (``rx_queue``) but not the limit, and one line per connection.
- if netlink is not available (a sandbox that filters it): the queue length from ``/proc/<master>/net/tcp``
  and ``tcp6``, read only down to the first connection (the kernel lists listening sockets first).

Unix-socket binds (``BIND=unix:/run/app.sock``, behind a proxy on the same host) are read the same way from
a ``unix_diag`` dump of the listening Unix sockets (``ss -lx``), which has both figures too; they have no
fallback (``/proc/net/unix`` has neither) and are then not reported.

Written by hand because neither psutil nor prometheus_client reads either figure.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

from . import names

_SOCKET_LINK = "socket:["

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, sockid (any)
# inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (network order), src[16], dst[16],
# if, cookie[8]; then expires, rqueue, wqueue, uid, inode
_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
# <linux/unix_diag.h>: unix_diag_req (family, protocol, pad, states, inode, show, cookie[2]) asking for the
# name and the queue lengths; unix_diag_msg (family, type, state, pad, inode, cookie[2]), then attributes
_UNIX_REQUEST = struct.Struct("=BBHIII8x")
_UDIAG_SHOW_NAME = 0x01
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_MESSAGE = struct.Struct("=BBBxI8x")
_RTATTR = struct.Struct("=HH")  # length (header included), type
_UNIX_DIAG_NAME = 0
_UNIX_DIAG_RQLEN = 4  # for a listening socket: connections queued, and the queue's limit
_RQLEN = struct.Struct("=II")


@dataclass(frozen=True)
class Listener:
    address: str  # "127.0.0.1:8000", "[::]:80", "unix:/run/app.sock"
    queued: int  # connections in the accept queue now
    limit: int | None  # the most it holds (more are dropped or refused); None when it cannot be read


def socket_inodes(pid: int, proc: str = "/proc") -> set[int]:
    """Inodes of the sockets that process ``pid`` holds open (empty if it is gone or not ours to read)."""
    fd_dir = f"{proc}/{pid}/fd"
    inodes: set[int] = set()
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(_SOCKET_LINK):
            inodes.add(int(target[len(_SOCKET_LINK) : -1]))
    return inodes


def _address(family: int, host: bytes, port: int) -> str:
    if family == socket.AF_INET:
        return f"{ipaddress.IPv4Address(host[:4])}:{port}"
    return f"[{ipaddress.IPv6Address(host)}]:{port}"


def _diag_dump(request: bytes) -> Iterator[memoryview]:
    """The payload of each message of a sock_diag dump answering ``request``."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(2.0)  # the kernel answers at once; never hang a scrape on it
        sock.sendall(header + request)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return
                if kind == _NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    raise OSError(-errno, "sock_diag request refused")
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise ValueError(f"malformed sock_diag message ({length} bytes)")
                yield memoryview(data)[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3  # NLMSG_ALIGN
            if not data:
                return


def _diag_listeners(family: int) -> Iterator[tuple[int, Listener]]:
    """(inode, listener) for every TCP socket of ``family`` in LISTEN state in this network namespace."""
    for payload in _diag_dump(_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN)):
        if len(payload) < _MESSAGE.size:
            raise ValueError(f"short sock_diag message ({len(payload)} bytes)")
        fields = _MESSAGE.unpack_from(payload)
        msg_family, sport, src = fields[0], int.from_bytes(fields[4], "big"), fields[6]
        rqueue, wqueue, inode = fields[11], fields[12], fields[14]
        yield inode, Listener(_address(msg_family, src, sport), rqueue, wqueue)


def _unix_listeners() -> Iterator[tuple[int, Listener]]:
    """(inode, listener) for every listening Unix socket in this network namespace, named ``unix:<path>``
    (``unix:@name`` for an abstract one)."""
    show = _UDIAG_SHOW_NAME | _UDIAG_SHOW_RQLEN
    for payload in _diag_dump(_UNIX_REQUEST.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, show)):
        if len(payload) < _UNIX_MESSAGE.size:
            raise ValueError(f"short unix_diag message ({len(payload)} bytes)")
        inode = _UNIX_MESSAGE.unpack_from(payload)[3]
        name, lengths = None, None
        offset = _UNIX_MESSAGE.size
        while offset + _RTATTR.size <= len(payload):
            length, kind = _RTATTR.unpack_from(payload, offset)
            if length < _RTATTR.size:
                break
            value = bytes(payload[offset + _RTATTR.size : offset + length])
            if kind == _UNIX_DIAG_NAME:
                name = value.rstrip(b"\0") if not value.startswith(b"\0") else b"@" + value[1:]
            elif kind == _UNIX_DIAG_RQLEN and len(value) >= _RQLEN.size:
                lengths = _RQLEN.unpack_from(value)
            offset += (length + 3) & ~3  # RTA_ALIGN
        if name is not None and lengths is not None:
            yield inode, Listener("unix:" + name.decode(errors="replace"), lengths[0], lengths[1])


def _proc_listeners(pid: int, proc: str) -> Iterator[tuple[int, Listener]]:
    """The fallback: queue lengths (``rx_queue``) of the LISTEN lines of ``/proc/<pid>/net/tcp{,6}``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = open(f"{proc}/{pid}/net/{table}")  # noqa: SIM115 - closed below, read lazily
        except OSError:
            continue
        with lines:
            next(lines, None)  # the header
            for line in lines:
                # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
                fields = line.split(None, 10)
                if len(fields) < 10 or int(fields[3], 16) != _TCP_LISTEN:
                    break  # past the listening sockets: the rest are connections, maybe many
                host_hex, port_hex = fields[1].split(":")
                # The kernel prints each 32-bit word of the address in host byte order.
                raw = bytes.fromhex(host_hex)
                host = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if len(host) == 4 else socket.AF_INET6
                queued = int(fields[4].split(":")[1], 16)
                yield int(fields[9]), Listener(_address(family, host, int(port_hex, 16)), queued, None)


def listeners(pid: int, proc: str = "/proc", exclude: int | None = None) -> list[Listener]:
    """The TCP and Unix sockets in LISTEN state that process ``pid`` holds, with their accept queues;
    ``exclude``: the inode of one not to report (the metrics port's, which the master holds too)."""
    wanted = socket_inodes(pid, proc) - {exclude}
    if not wanted:
        return []
    try:
        everything = [
            item for family in (socket.AF_INET, socket.AF_INET6) for item in _diag_listeners(family)
        ]
    except (OSError, ValueError, struct.error):
        everything = list(_proc_listeners(pid, proc))
    try:
        everything += _unix_listeners()
    except (OSError, ValueError, struct.error):
        pass  # no fallback for Unix sockets: not reported
    return sorted((listener for inode, listener in everything if inode in wanted), key=lambda x: x.address)


def families(master_pid: int, exclude: int | None = None) -> Iterator[Metric]:
    """The two gauges, one series per listening address of the master but ``exclude`` (see listeners);
    nothing if it cannot be read."""
    try:
        found = listeners(master_pid, exclude=exclude)
    except Exception:  # /proc unreadable or unexpected: a scrape without these figures, never a failed one
        return
    queued = GaugeMetricFamily(
        names.LISTEN_BACKLOG,
        "Connections the kernel accepted on the app's listening socket that no worker has accepted yet.",
        labels=["listener"],
    )
    limit = GaugeMetricFamily(
        names.LISTEN_BACKLOG_LIMIT,
        "Most connections the listening socket's accept queue holds (Gunicorn's backlog, capped by "
        "net.core.somaxconn).",
        labels=["listener"],
    )
    for listener in found:
        queued.add_metric([listener.address], listener.queued)
        if listener.limit is not None:
            limit.add_metric([listener.address], listener.limit)
    yield queued
    yield limit
