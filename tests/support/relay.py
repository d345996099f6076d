"""A loopback HTTP/1.1 relay in front of a daemon that sees each request and can cut its answer.

It parses the requests passing through (method, path, headers, a JSON body's
``filepath``) and counts them per file (``stats``); a fault armed for a
``filepath`` drops (or stalls) the connection after that many bytes of the
answer, for the next ``times`` requests of that file.  Threads, bounded:
every socket has a timeout and ``stop()`` closes them all.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class Fault:
    drop_after: int
    times: int
    stall: bool = False


class Relay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.faults: dict[str, Fault] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.requests: list[dict[str, Any]] = []
        self.sockets: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, filepath: str, drop_after: int, times: int = 1, stall: bool = False) -> None:
        with self.lock:
            self.faults[filepath] = Fault(drop_after, times, stall)

    def stat(self, filepath: str) -> dict[str, int]:
        with self.lock:
            return dict(self.stats.get(filepath, {"gets": 0, "ranged": 0}))

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    # -- internals ------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=30)
            except OSError:
                client.close()
                continue
            client.settimeout(60)
            with self.lock:
                self.sockets += [client, server]
            state: dict[str, Any] = {"fault": None, "sent": 0}
            threading.Thread(target=self._upstream, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, state), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, state: dict[str, Any]) -> None:
        buffer = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
                buffer = self._parse(buffer, state)
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(server)

    def _parse(self, buffer: bytes, state: dict[str, Any]) -> bytes:
        while b"\r\n\r\n" in buffer:
            head, rest = buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0") or 0)
            if len(rest) < length:
                return buffer
            body, buffer = rest[:length], rest[length:]
            try:
                filepath = json.loads(body).get("filepath") if body else None
            except (ValueError, AttributeError):
                filepath = None
            with self.lock:
                self.requests.append({"line": lines[0], "headers": headers, "filepath": filepath})
                if filepath is not None:
                    entry = self.stats.setdefault(filepath, {"gets": 0, "ranged": 0})
                    entry["gets"] += 1
                    if "range" in headers:
                        entry["ranged"] += 1
                    fault = self.faults.get(filepath)
                    if fault is not None and fault.times > 0:
                        fault.times -= 1
                        state["fault"], state["sent"] = fault, 0
                    else:
                        state["fault"] = None
        return buffer

    def _downstream(self, server: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                fault: Fault | None = state["fault"]
                if fault is not None and state["sent"] + len(data) > fault.drop_after:
                    keep = max(fault.drop_after - state["sent"], 0)
                    client.sendall(data[:keep])
                    if fault.stall:
                        while not self.stopped:  # hold the connection open, send nothing more
                            try:
                                if not server.recv(65536):
                                    break
                            except OSError:
                                break
                    break
                state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
