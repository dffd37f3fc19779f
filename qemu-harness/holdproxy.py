#!/usr/bin/env python3
"""A unix-socket -> unix-socket proxy that can hold a client's outgoing data.

The harness puts one between a qemu and the NBD server. While *held*, the
bytes qemu sends (NBD requests, write payloads included) are kept in the
proxy instead of being forwarded: these are "writes in flight" that the
storage has not seen yet. Replies from the server still flow back. On
*release* the held bytes go to the server, even if the qemu that sent them
has since been frozen (SIGSTOP) or killed (SIGKILL): that is exactly a stale
writer's late writes arriving after a hand-off.

Runs its asyncio loop in a background thread; hold()/release()/stats() are
safe to call from any thread. Standalone: holdproxy.py LISTEN UPSTREAM, then
send lines "hold", "release", "stats" to LISTEN.ctl.
"""
import asyncio
import json
import os
import sys
import threading
import time


class _Conn:
    def __init__(self, proxy, cr, cw):
        self.proxy = proxy
        self.cr, self.cw = cr, cw
        self.sr = self.sw = None
        self.held = bytearray()
        self.client_closed = False

    async def run(self):
        try:
            self.sr, self.sw = await asyncio.open_unix_connection(self.proxy.upstream)
        except OSError:
            self.cw.close()
            return
        await asyncio.gather(self.up(), self.down(), return_exceptions=True)

    async def up(self):
        """Client -> server, unless held."""
        try:
            while True:
                data = await self.cr.read(65536)
                if not data:
                    break
                self.proxy.bytes_up += len(data)
                if self.proxy.holding:
                    self.held += data
                    self.proxy.held_bytes += len(data)
                else:
                    self.sw.write(data)
                    await self.sw.drain()
        except (ConnectionError, OSError):
            pass
        self.client_closed = True
        # A dead client's held data stays until release(); then it is sent
        # and the server side is closed once the server had time to answer.
        while self.proxy.holding and self.held:
            await asyncio.sleep(0.05)
        await self.flush_held()
        await asyncio.sleep(self.proxy.linger)
        try:
            self.sw.close()
        except OSError:
            pass

    async def flush_held(self):
        if self.held:
            data, self.held = bytes(self.held), bytearray()
            self.proxy.released_bytes += len(data)
            try:
                self.sw.write(data)
                await self.sw.drain()
            except (ConnectionError, OSError):
                pass

    async def down(self):
        """Server -> client, always (replies to a frozen client just queue)."""
        try:
            while True:
                data = await self.sr.read(65536)
                if not data:
                    break
                self.proxy.bytes_down += len(data)
                if not self.client_closed:
                    try:
                        self.cw.write(data)
                        await self.cw.drain()
                    except (ConnectionError, OSError):
                        self.client_closed = True
        except (ConnectionError, OSError):
            pass
        try:
            self.cw.close()
        except OSError:
            pass


class HoldProxy:
    def __init__(self, listen, upstream, linger=2.0):
        self.listen, self.upstream, self.linger = listen, upstream, linger
        self.holding = False
        self.held_bytes = self.released_bytes = 0
        self.bytes_up = self.bytes_down = 0
        self.conns = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def start(self):
        if os.path.exists(self.listen):
            os.unlink(self.listen)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _main(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self.loop.run_forever()

    async def _serve(self):
        async def on_client(r, w):
            c = _Conn(self, r, w)
            self.conns.append(c)
            try:
                await c.run()
            except asyncio.CancelledError:
                pass  # stop() cancels every connection

        self.server = await asyncio.start_unix_server(on_client, path=self.listen)
        self._ready.set()

    def _call(self, fn):
        fut = asyncio.run_coroutine_threadsafe(fn(), self.loop)
        return fut.result(timeout=30)

    def hold(self):
        async def f():
            self.holding = True
        self._call(f)

    def release(self):
        """Forward everything held, then pass data through again."""
        async def f():
            self.holding = False
            for c in self.conns:
                await c.flush_held()
        self._call(f)

    def stats(self):
        return {"holding": self.holding, "held_bytes": self.held_bytes,
                "released_bytes": self.released_bytes, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "connections": len(self.conns)}

    def wait_held(self, min_bytes, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.held_bytes >= min_bytes:
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        async def f():
            self.server.close()
            for c in self.conns:
                for w in (c.cw, c.sw):
                    if w is not None:
                        try:
                            w.close()
                        except OSError:
                            pass
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self._call(f)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    p = HoldProxy(sys.argv[1], sys.argv[2]).start()
    import socket
    ctl = sys.argv[1] + ".ctl"
    if os.path.exists(ctl):
        os.unlink(ctl)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(ctl)
    s.listen(4)
    while True:
        c, _ = s.accept()
        with c, c.makefile("rw") as f:
            for line in f:
                cmd = line.strip()
                if cmd == "hold":
                    p.hold()
                elif cmd == "release":
                    p.release()
                f.write(json.dumps(p.stats()) + "\n")
                f.flush()


if __name__ == "__main__":
    main()
