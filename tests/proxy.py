"""A TCP proxy on loopback that injects network faults between the nodes and the server.

Three faults, each named for what a real network does:

* :meth:`TcpProxy.cut` — every connection in flight is torn down in both
  directions at once: each end reads EOF or gets a reset immediately, as when a
  router or a NAT drops its state and answers with RSTs.
* :meth:`TcpProxy.partition` / :meth:`TcpProxy.heal` — packets stop flowing but
  nobody is told: connections stay open (half-open from both ends' point of
  view) and bytes are held, as TCP would retransmit them, until the partition
  heals. New connections are accepted and wait too.
* :meth:`TcpProxy.close` — the proxy stops listening: new connections are
  refused, and every open one is cut.

Why ``shutdown`` and not ``close``: a pipe thread blocked in ``recv()`` keeps
the kernel socket alive, so ``close()`` from another thread neither wakes it
nor sends anything to the peer. ``shutdown(SHUT_RDWR)`` acts on the socket
itself: the blocked ``recv()`` returns at once and the peer gets a FIN; the
pipe thread then closes with SO_LINGER 0, which sends a reset. The same holds
for the listener, whose ``accept()`` only wakes on ``shutdown``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_ABORTIVE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port, with faults on demand."""

    target_port: int
    port: int = 0
    cuts: int = 0
    #: Chooses the port of each new connection (None: refuse it), in place of ``target_port``:
    #: a Service in front of an active server and its standby (tests/test_standby.py).
    route: Callable[[], int | None] | None = None
    _listener: socket.socket = field(init=False)
    _accepting: threading.Thread = field(init=False)
    _conns: set[socket.socket] = field(default_factory=set)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _flowing: threading.Event = field(default_factory=threading.Event)
    _closed: bool = False

    def __post_init__(self) -> None:
        self._flowing.set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepting.start()

    # ------------------------------------------------------------ faults

    def cut(self) -> int:
        """Tear down every open connection in both directions; returns how many pairs were cut."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            _abort(s)
        pairs = len(conns) // 2
        if pairs:
            self.cuts += 1
        return pairs

    def partition(self) -> None:
        """Stop forwarding without telling either end (bytes are held until :meth:`heal`)."""
        self._flowing.clear()

    def heal(self) -> None:
        """End a partition: held bytes and waiting connections go through."""
        self._flowing.set()

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns) // 2

    def close(self) -> None:
        """Stop listening (new connections are refused) and cut everything in flight."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accepting.join(timeout=5)
        self._flowing.set()  # release pipes held by a partition so they see the cut
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)

    # ------------------------------------------------------------ forwarding

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._flowing.wait()
            target = self.route() if self.route is not None else self.target_port
            if target is None:
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            with self._lock:
                if self._closed:
                    _abort(client)
                    _abort(upstream)
                    return
                self._conns |= {client, upstream}
                self._threads = [t for t in self._threads if t.is_alive()]
                for a, b in ((client, upstream), (upstream, client)):
                    thread = threading.Thread(target=self._pipe, args=(a, b), name="proxy-pipe", daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # One direction ended (EOF, reset or a cut): end the pair, as the network would.
            with self._lock:
                self._conns -= {src, dst}
            _abort(src)
            _abort(dst)


def _abort(s: socket.socket) -> None:
    """Wake any thread blocked on ``s``, tell the peer (FIN, then RST), and release it."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORTIVE)
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
