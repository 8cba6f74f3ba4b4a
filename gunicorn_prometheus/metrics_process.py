"""The metrics server's process and its supervisor.

The Gunicorn master must stay single-threaded (it forks workers) and must never wait on a scrape, so the
metrics server is a separate program. The master binds the metrics socket itself (so a taken port fails
the start in one line), hands it to a small supervisor process spawned with a fresh interpreter (no fork:
nothing of the master is inherited but that socket), and closes its own copy before any worker forks.
The supervisor keeps the socket and restarts the server within a second if it dies, so the port never
goes away while the app runs. Gunicorn's master reaps any child it did not fork as a worker without
reporting it, so it cannot be the supervisor itself; the supervisor dies with the master
(PR_SET_PDEATHSIG plus a parent check), and the master stops it on exit: nothing is left running.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 4.0


def die_with_parent() -> None:
    """Ask the kernel to send SIGTERM to this process when its parent dies (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def bind_metrics_socket(host: str, port: int) -> socket.socket:
    """Bind and listen in the master; OSError here means the metrics port is unusable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def _command(module: str, fd: int, master_pid: int, directory: str) -> list[str]:
    """A fresh interpreter running `module` on the inherited socket (see `parse_args`)."""
    return [
        sys.executable,
        "-m",
        module,
        "--fd",
        str(fd),
        "--master-pid",
        str(master_pid),
        "--dir",
        directory,
    ]


def start(sock: socket.socket, *, master_pid: int, directory: str) -> subprocess.Popen:
    """Spawn the supervisor with the listening socket; the caller closes its own copy afterwards."""
    fd = sock.fileno()
    return subprocess.Popen(
        _command("gunicorn_prometheus.metrics_process", fd, master_pid, directory),
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen, timeout: float = 3.0) -> None:
    """Stop a child (SIGTERM), wait for it, and kill it if it will not go."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _log(message: str) -> None:
    print(f"[gunicorn-prometheus] {message}", file=sys.stderr, flush=True)


def supervise(fd: int, master_pid: int, directory: str) -> int:
    """Run the metrics server, restart it when it dies, and leave when the master is gone or asks."""
    die_with_parent()
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the master decides.
    command = _command("gunicorn_prometheus.metrics_server", fd, master_pid, directory)
    delay = RESTART_DELAY
    server: subprocess.Popen | None = None
    while not stopping and os.getppid() == master_pid:
        if server is None:
            started = time.monotonic()
            server = subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL)
        try:
            code = server.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        if stopping:
            break
        # A server that lived a while gets restarted at once; a crash loop backs off up to a few seconds.
        delay = RESTART_DELAY if time.monotonic() - started > 10 else min(delay * 2, MAX_RESTART_DELAY)
        _log(f"metrics server (pid {server.pid}) exited with code {code}; restarting in {delay:g} s")
        server = None
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
    if server is not None:
        stop(server)
    return 0


def parse_args(description: str | None) -> argparse.Namespace:
    """The command line shared by the supervisor and the server: the socket, the master, the directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--master-pid", type=int, required=True)
    parser.add_argument("--dir", required=True, help="PROMETHEUS_MULTIPROC_DIR")
    return parser.parse_args()


def main() -> int:
    args = parse_args(__doc__)
    return supervise(args.fd, args.master_pid, args.dir)


if __name__ == "__main__":
    sys.exit(main())
