"""Clients that tie up a server connection: one that never finishes its
TLS hello, one that sends its request and then reads the answer a byte a
second. Used by the unit and kernel tests that check a slow client delays
no other scrape."""
from __future__ import annotations

import base64
import socket
import ssl
import threading
from types import TracebackType


class SlowClients:
    """Both clients against 127.0.0.1:``port`` while the context is open."""

    def __init__(self, port: int, ctx: ssl.SSLContext, user: str, password: str) -> None:
        self.stalled = socket.create_connection(("127.0.0.1", port))   # never says hello
        self.slow = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                    server_hostname="127.0.0.1")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.slow.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}"
                          "\r\n\r\n".encode())
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._trickle)

    def _trickle(self) -> None:
        while not self._stop.wait(1.0):
            try:
                if not self.slow.recv(1):
                    return
            except OSError:
                return

    def __enter__(self) -> SlowClients:
        self._reader.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._reader.join()
        self.slow.close()
        self.stalled.close()
