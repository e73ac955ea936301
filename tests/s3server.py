"""A real S3 server for tests: moto_server (moto[server]) on a free loopback port, and a TCP
relay in front of it that a test can take down and bring back, the way a store goes away for
a while (moto keeps its objects in memory, so the server itself must keep running)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Until `url` answers (a server `proc` started, writing `log`); an error if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=1)
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")


class MotoServer:
    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.log = log.open("w")
        # At the lowest priority: a real store's CPU is not the training machine's.
        self.proc = subprocess.Popen(["nice", "-n", "19", exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_http(self.url + "/moto-api/", self.proc, log, "moto_server", 60)

    def reset(self) -> None:
        """Drop every bucket and object (between tests)."""
        urllib.request.urlopen(urllib.request.Request(self.url + "/moto-api/reset", method="POST"), timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Relay:
    """127.0.0.1:<port> -> upstream port, with down() (refuse and cut every connection) and up()."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.status: Optional[tuple[int, str]] = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def answer_with(self, status: Optional[tuple[int, str]]) -> None:
        """Answer every request with this S3 error (e.g. (503, "SlowDown"), (403, "AccessDenied"))
        instead of relaying it; None: relay again."""
        self.status = status

    def _refuse(self, client: socket.socket, status: tuple[int, str]) -> None:
        code, name = status
        with contextlib.suppress(OSError):
            client.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    break
                request += chunk
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code><Message>{name}</Message>'
                    "</Error>").encode()
            reason = {503: "Slow Down", 403: "Forbidden"}.get(code, "Error")
            client.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: "
                           f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        client.close()

    def down(self) -> None:
        with self.lock:
            if self.listener is not None:
                with contextlib.suppress(OSError):
                    self.listener.shutdown(socket.SHUT_RDWR)
                self.listener.close()
                self.listener = None
            for s in list(self.sockets):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            if self.status is not None:
                threading.Thread(target=self._refuse, args=(client, self.status), daemon=True).start()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                if self.listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self.sockets |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
