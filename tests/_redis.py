"""A minimal RESP client for the Redis tests (no Python Redis client is a test dependency):
enough to inspect streams and keys and to delete a test's keys."""

from __future__ import annotations

import socket
from typing import Any

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"


class RespError(Exception):
    """An error reply from Redis."""


class Resp:
    """A minimal synchronous RESP2 client, enough to inspect streams and delete keys."""

    def __init__(self, host: str = HOST, port: int = PORT, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args: Any) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            return self.file.read(n + 2)[:-2].decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ValueError(f"unexpected RESP line {line!r}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def entries(self, stream: str) -> list[tuple[str, dict[str, str]]]:
        """XRANGE stream - +, as (id, fields)."""
        return [
            (eid, dict(zip(flat[::2], flat[1::2])))
            for eid, flat in self("XRANGE", stream, "-", "+")
        ]

    def delete_prefix(self, prefix: str) -> None:
        cursor = "0"
        while True:
            cursor, keys = self("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                self("DEL", *keys)
            if cursor == "0":
                return


def redis_ping() -> str | None:
    """None when Redis answers PING, else why not."""
    try:
        r = Resp(timeout=2.0)
        try:
            return None if r("PING") == "PONG" else "Redis did not answer PONG"
        finally:
            r.close()
    except (OSError, RespError) as e:
        return f"Redis at {HOST}:{PORT} is unreachable ({e})"
