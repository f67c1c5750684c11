"""The fault proxy injects the faults it claims: a cut is seen at once by both ends, a
partition holds bytes without telling anyone, and a closed proxy refuses connections."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.proxy import TcpProxy

pytestmark = pytest.mark.timeout(30)


class EchoServer:
    """A loopback server that echoes, and remembers the sockets it accepted."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.ready = threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            self.ready.release()

    def echo_once(self, conn: socket.socket) -> None:
        conn.sendall(conn.recv(1024))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    p = TcpProxy(echo.port)
    yield p
    p.close()


def _connect(proxy: TcpProxy, echo: EchoServer) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert echo.ready.acquire(timeout=5), "the proxy never connected upstream"
    server_side = echo.accepted[-1]
    client.sendall(b"ping")
    echo.echo_once(server_side)
    assert client.recv(4) == b"ping"
    return client, server_side


def _sees_the_end(s: socket.socket) -> bool:
    """True if ``s`` reads EOF or a reset within one second (False: still silently open)."""
    s.settimeout(1.0)
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_cut_is_seen_at_once_by_an_idle_client_and_by_the_server(proxy: TcpProxy, echo: EchoServer) -> None:
    client, server_side = _connect(proxy, echo)
    assert proxy.open_connections() == 1
    assert proxy.cut() == 1
    assert _sees_the_end(client), "the idle client did not see the cut within a second"
    assert _sees_the_end(server_side), "the server did not see the cut within a second"
    assert proxy.cuts == 1 and proxy.open_connections() == 0
    client.close()


def test_after_a_cut_new_connections_go_through(proxy: TcpProxy, echo: EchoServer) -> None:
    first, _ = _connect(proxy, echo)
    proxy.cut()
    second, _ = _connect(proxy, echo)  # echoes: the proxy still forwards
    first.close()
    second.close()


def test_an_end_that_closes_ends_the_pair(proxy: TcpProxy, echo: EchoServer) -> None:
    client, server_side = _connect(proxy, echo)
    server_side.close()
    assert _sees_the_end(client)
    client.close()


def test_close_refuses_new_connections_and_cuts_open_ones(proxy: TcpProxy, echo: EchoServer) -> None:
    client, _ = _connect(proxy, echo)
    proxy.close()
    assert _sees_the_end(client)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    client.close()


def test_a_partition_holds_bytes_silently_until_it_heals(proxy: TcpProxy, echo: EchoServer) -> None:
    client, server_side = _connect(proxy, echo)
    proxy.partition()
    assert proxy.partitioned
    client.sendall(b"held")
    server_side.settimeout(0.5)
    with pytest.raises(TimeoutError):
        server_side.recv(4)  # nothing arrives, and nothing says the connection is gone
    client.settimeout(0.5)
    with pytest.raises(TimeoutError):
        client.recv(4)
    proxy.heal()
    server_side.settimeout(5)
    assert server_side.recv(4) == b"held"
    client.close()


def test_a_cut_during_a_partition_still_ends_both_sides(proxy: TcpProxy, echo: EchoServer) -> None:
    client, server_side = _connect(proxy, echo)
    proxy.partition()
    proxy.cut()
    assert _sees_the_end(client) and _sees_the_end(server_side)
    proxy.heal()
    client.close()
