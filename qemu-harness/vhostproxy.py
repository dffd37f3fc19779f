#!/usr/bin/env python3
"""A vhost-user proxy that can hold a frontend's requests in its virtqueues.

The vhost-user-blk analogue of holdproxy.py. Over NBD a write in flight is
bytes on a socket, so a proxy can keep them. Over vhost-user the data never
crosses a socket: the guest puts a request in a virtqueue in shared memory and
*kicks* (writes an eventfd); the backend only looks at the ring when kicked
(or while it is busy with that queue anyway). So this proxy sits on the
vhost-user socket between qemu and the backend, relays every message both
ways with its file descriptors, and substitutes eventfds of its own for each
queue's kick and call fds:

- kick (qemu -> backend): forwarded, unless *held*. A held kick is counted,
  and the request it announced stays in the ring, unseen by the backend: a
  write in flight that the storage has not seen yet.
- call (backend -> qemu): always forwarded; counted, so the harness can tell
  that the backend answered held requests after their release.

On *release* every queue that had a kick held is kicked, even if the qemu
that wrote the requests has since been frozen (SIGSTOP) or killed (SIGKILL):
the backend still maps the guest's memory (a memfd it was handed) and its
connection stays open through the proxy, so it finds the requests and serves
or refuses them: exactly a stale writer's late writes after a hand-off.

The proxy maps the guest memory read-only (the regions of SET_MEM_TABLE /
ADD_MEM_REG) to read each ring's avail and used indexes: `pending()` is the
number of requests the guest made available and the backend has not
completed, the direct measure of what is held.

hold()/release()/stats()/wait_held() are safe from any thread. Python stdlib
only (3.10+: os.eventfd, socket.recv_fds/send_fds).
"""
import mmap
import os
import select
import socket
import struct
import threading
import time

HDR = struct.Struct("<III")  # request, flags, payload size
MAX_FDS = 8

# Frontend requests this proxy looks into (vhost-user spec numbering).
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_KICK = 12
SET_VRING_CALL = 13
ADD_MEM_REG = 37
REM_MEM_REG = 38
VRING_NOFD = 0x100  # u64 payload flag: no fd (polling)
VRING_IDX_MASK = 0xFF


def _recv_exact(sock, n):
    """n bytes and any fds that came with them; None at EOF."""
    data, fds = b"", []
    while len(data) < n:
        try:
            chunk, more, _flags, _addr = socket.recv_fds(sock, n - len(data), MAX_FDS)
        except OSError:
            return None
        fds += more
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None
        data += chunk
    return data, fds


def _recv_msg(sock):
    """One vhost-user message: (header, payload, fds); None at EOF."""
    got = _recv_exact(sock, HDR.size)
    if got is None:
        return None
    hdr, fds = got
    size = HDR.unpack(hdr)[2]
    body = b""
    if size:
        got = _recv_exact(sock, size)
        if got is None:
            for fd in fds:
                os.close(fd)
            return None
        body, more = got
        fds += more
    return hdr, body, fds


def _send(sock, data, fds):
    try:
        socket.send_fds(sock, [data], fds)
    except OSError:
        return False
    return True


class _Queue:
    """One virtqueue's substituted eventfds and ring addresses."""

    def __init__(self):
        self.num = 0
        self.avail_ua = self.used_ua = None
        self.guest_kick = None  # qemu's kick fd (we read it)
        self.proxy_kick = None  # ours, handed to the backend (we write it)
        self.guest_call = None  # qemu's call fd (we write it)
        self.proxy_call = None  # ours, handed to the backend (we read it)
        self.held_kicks = 0


class VhostHoldProxy:
    def __init__(self, listen, upstream):
        self.listen, self.upstream = listen, upstream
        self.lock = threading.Lock()
        self.holding = False
        self.queues = {}
        self.regions = []  # (userspace_addr, size, mmap)
        self.kicks = self.kicks_held = self.kicks_released = self.calls = 0
        self.messages = 0
        self.client_closed = False
        self.stopped = False
        self.lsock = None
        self.client = self.server = None
        self.watch_r, self.watch_w = os.pipe()  # wakes the eventfd pump

    # -- life cycle ---------------------------------------------------------

    def start(self):
        if os.path.exists(self.listen):
            os.unlink(self.listen)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.listen)
        self.lsock.listen(1)
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _accept(self):
        try:
            self.client, _ = self.lsock.accept()
        except OSError:
            return
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.server.connect(self.upstream)
        except OSError:
            self.client.close()
            return
        threading.Thread(target=self._relay_up, daemon=True).start()
        threading.Thread(target=self._relay_down, daemon=True).start()

    def stop(self):
        """Close both sides: the backend then sees its frontend leave."""
        self.stopped = True
        for s in (self.lsock, self.client, self.server):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        os.write(self.watch_w, b"x")
        try:
            os.unlink(self.listen)
        except OSError:
            pass

    # -- the socket ---------------------------------------------------------

    def _relay_up(self):
        """qemu -> backend: every request, kick/call fds substituted."""
        while (msg := _recv_msg(self.client)) is not None:
            hdr, body, fds = msg
            fds = self._inspect(HDR.unpack(hdr)[0], body, fds)
            self.messages += 1
            ok = _send(self.server, hdr + body, fds)
            for fd in fds:
                os.close(fd)
            if not ok:
                break
        # A dead frontend: keep the backend's side open (as a held NBD
        # connection stays open) until stop(), so a release still reaches it.
        self.client_closed = True

    def _relay_down(self):
        """backend -> qemu: replies, relayed as they are."""
        while (msg := _recv_msg(self.server)) is not None:
            hdr, body, fds = msg
            if not self.client_closed:
                _send(self.client, hdr + body, fds)
            for fd in fds:
                os.close(fd)

    def _queue(self, idx):
        return self.queues.setdefault(idx, _Queue())

    def _inspect(self, req, body, fds):
        """Note what the proxy needs; return the fds to pass on (owned by
        the caller, closed after sending)."""
        with self.lock:
            if req == SET_VRING_NUM and len(body) >= 8:
                idx, num = struct.unpack_from("<II", body)
                self._queue(idx).num = num
            elif req == SET_VRING_ADDR and len(body) >= 40:
                idx, _fl, _desc, used, avail, _log = struct.unpack_from("<IIQQQQ", body)
                q = self._queue(idx)
                q.used_ua, q.avail_ua = used, avail
            elif req == SET_MEM_TABLE and len(body) >= 8:
                n, = struct.unpack_from("<I", body)
                self._unmap()
                for i in range(min(n, len(fds))):
                    _gpa, size, ua, off = struct.unpack_from("<QQQQ", body, 8 + 32 * i)
                    self._map(fds[i], size, ua, off)
            elif req == ADD_MEM_REG and len(body) >= 40 and fds:
                _gpa, size, ua, off = struct.unpack_from("<QQQQ", body, 8)
                self._map(fds[0], size, ua, off)
            elif req == REM_MEM_REG and len(body) >= 40:
                _gpa, size, ua, _off = struct.unpack_from("<QQQQ", body, 8)
                self.regions = [r for r in self.regions if r[0] != ua]
            elif req in (SET_VRING_KICK, SET_VRING_CALL) and len(body) >= 8 and fds:
                v, = struct.unpack_from("<Q", body)
                if not v & VRING_NOFD:
                    q = self._queue(v & VRING_IDX_MASK)
                    ours = os.eventfd(0, os.EFD_CLOEXEC)
                    theirs = os.dup(fds[0])
                    if req == SET_VRING_KICK:
                        q.guest_kick, q.proxy_kick = theirs, ours
                    else:
                        q.guest_call, q.proxy_call = theirs, ours
                    for fd in fds:
                        os.close(fd)
                    os.write(self.watch_w, b"x")
                    return [os.dup(ours)]
        return fds

    def _map(self, fd, size, ua, off):
        try:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
        except (OSError, ValueError):
            return
        self.regions.append((ua, size, m))

    def _unmap(self):
        self.regions = []

    def _u16(self, ua):
        for base, size, m in self.regions:
            if base <= ua and ua + 2 <= base + size:
                return struct.unpack_from("<H", m, ua - base)[0]
        return None

    # -- the eventfds -------------------------------------------------------

    def _pump(self):
        """Forward kicks (unless held) and calls between the eventfds."""
        while not self.stopped:
            with self.lock:
                watch = {self.watch_r: None}
                for q in self.queues.values():
                    if q.guest_kick is not None:
                        watch[q.guest_kick] = (q, "kick")
                    if q.proxy_call is not None:
                        watch[q.proxy_call] = (q, "call")
            ready, _, _ = select.select(list(watch), [], [])
            for fd in ready:
                try:
                    os.read(fd, 8 if fd != self.watch_r else 64)
                except OSError:
                    continue
                what = watch.get(fd)
                if what is None:
                    continue
                q, kind = what
                with self.lock:
                    if kind == "kick":
                        self.kicks += 1
                        if self.holding:
                            q.held_kicks += 1
                            self.kicks_held += 1
                        elif q.proxy_kick is not None:
                            os.eventfd_write(q.proxy_kick, 1)
                    else:
                        self.calls += 1
                        if q.guest_call is not None and not self.client_closed:
                            try:
                                os.eventfd_write(q.guest_call, 1)
                            except OSError:
                                pass

    # -- the harness's side -------------------------------------------------

    def hold(self):
        with self.lock:
            self.holding = True

    def release(self):
        """Stop holding; kick every queue that had a kick held."""
        with self.lock:
            self.holding = False
            for q in self.queues.values():
                if q.held_kicks and q.proxy_kick is not None:
                    os.eventfd_write(q.proxy_kick, 1)
                    self.kicks_released += q.held_kicks
                    q.held_kicks = 0

    def pending(self):
        """Requests made available and not yet completed, over all queues
        (None until the rings are known)."""
        total, known = 0, False
        with self.lock:
            for q in self.queues.values():
                if q.avail_ua is None or q.used_ua is None:
                    continue
                a, u = self._u16(q.avail_ua + 2), self._u16(q.used_ua + 2)
                if a is None or u is None:
                    continue
                known = True
                total += (a - u) & 0xFFFF
        return total if known else None

    def completed(self):
        """Sum of the used indexes (requests the backend completed, mod 2^16)."""
        total = 0
        with self.lock:
            for q in self.queues.values():
                if q.used_ua is not None:
                    total += self._u16(q.used_ua + 2) or 0
        return total

    def stats(self):
        with self.lock:
            return {"kicks": self.kicks, "kicks_held": self.kicks_held,
                    "kicks_released": self.kicks_released, "calls": self.calls,
                    "messages": self.messages, "client_closed": self.client_closed,
                    "held_kicks_now": sum(q.held_kicks for q in self.queues.values())}

    def wait_held(self, min_requests, timeout, settle=0.5):
        """True once a kick was held and, with no kick getting through, at
        least `min_requests` requests stay in the rings unseen (the backend
        is idle: what it had taken has completed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["kicks_held"] > 0:
                before = self.completed()
                time.sleep(settle)
                p = self.pending()
                if p is not None and p >= min_requests and self.completed() == before:
                    return True
            time.sleep(0.1)
        return False
