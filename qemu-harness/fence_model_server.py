#!/usr/bin/env python3
"""A minimal *model* of a fencing NBD server, to self-test the harness.

This is not blkshim. It exists so that the harness's PASS path can be
exercised before blkshim serves NBD (NBD_SERVER=model): the fault scenarios
must FAIL against qemu-nbd (no fencing) and PASS against a server that
fences. It implements the rule the harness expects of blkshim:

  a client connects to export NAME@EPOCH; the disk has a current epoch
  (starting at 0). A write (WRITE, TRIM, WRITE_ZEROES) at an epoch below
  the current one is refused with EPERM; a write at a higher epoch first
  advances the current epoch to it (the destination's first write fences
  every older writer). Reads and flushes are served at any epoch.

NBD fixed newstyle handshake, simple replies only, one request at a time per
connection (asyncio, so the epoch check and the write are atomic).

usage: fence_model_server.py --socket SOCK NAME=IMG --size BYTES
"""
import argparse
import asyncio
import os
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_REPLY = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 6
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FLAGS = 1 | 4 | 32 | 64  # HAS_FLAGS, SEND_FLUSH, SEND_TRIM, SEND_WRITE_ZEROES
EPERM, EINVAL, EIO = 1, 22, 5


class Disk:
    def __init__(self, path, size):
        self.fd = os.open(path, os.O_RDWR)
        self.size = size
        self.epoch = 0
        self.refused = 0


class Server:
    def __init__(self, disks):
        self.disks = disks

    async def handle(self, r, w):
        try:
            await self.session(r, w)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def session(self, r, w):
        w.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
        (cflags,) = struct.unpack(">I", await r.readexactly(4))
        no_zeroes = bool(cflags & 2)
        while True:
            magic, opt, ln = struct.unpack(">QII", await r.readexactly(16))
            data = await r.readexactly(ln) if ln else b""
            if magic != IHAVEOPT:
                return

            def reply(rtype, payload=b""):
                w.write(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(payload)) + payload)

            if opt == OPT_EXPORT_NAME:
                name = data.decode(errors="replace")
                disk, epoch = self.lookup(name)
                if disk is None:
                    return
                w.write(struct.pack(">QH", disk.size, FLAGS) + (b"" if no_zeroes else b"\0" * 124))
                break
            if opt in (OPT_GO, OPT_INFO):
                (nl,) = struct.unpack(">I", data[:4])
                name = data[4:4 + nl].decode(errors="replace")
                disk, epoch = self.lookup(name)
                if disk is None:
                    reply(REP_ERR_UNKNOWN, b"unknown export or no @epoch")
                    continue
                reply(REP_INFO, struct.pack(">HQH", 0, disk.size, FLAGS))
                reply(REP_ACK)
                if opt == OPT_GO:
                    break
                continue
            if opt == OPT_ABORT:
                reply(REP_ACK)
                return
            reply(REP_ERR_UNSUP)
        await w.drain()
        await self.transmission(r, w, disk, epoch, name)

    def lookup(self, name):
        base, _, ep = name.partition("@")
        if base not in self.disks or not ep.isdigit():
            return None, None
        return self.disks[base], int(ep)

    async def transmission(self, r, w, disk, epoch, name):
        while True:
            magic, _flags, cmd, handle, off, ln = struct.unpack(">IHHQQI", await r.readexactly(28))
            if magic != REQ_MAGIC:
                return
            payload = await r.readexactly(ln) if cmd == CMD_WRITE else b""
            err, data = 0, b""
            if off + ln > disk.size:
                err = EINVAL
            elif cmd == CMD_READ:
                data = os.pread(disk.fd, ln, off)
            elif cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                if epoch < disk.epoch:
                    err = EPERM
                    disk.refused += 1
                    print(f"refused stale write from {name} (current epoch {disk.epoch}) "
                          f"at {off}+{ln}", file=sys.stderr, flush=True)
                else:
                    if epoch > disk.epoch:
                        print(f"epoch {disk.epoch} -> {epoch} (first write of {name})",
                              file=sys.stderr, flush=True)
                        disk.epoch = epoch
                    os.pwrite(disk.fd, payload if cmd == CMD_WRITE else b"\0" * ln, off)
            elif cmd == CMD_FLUSH:
                os.fdatasync(disk.fd)
            elif cmd == CMD_DISC:
                return
            else:
                err = EINVAL
            w.write(struct.pack(">IIQ", SIMPLE_REPLY, err, handle) + (data if not err else b""))
            await w.drain()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("disks", nargs="+", help="NAME=PATH")
    a = ap.parse_args()
    disks = {}
    for d in a.disks:
        n, _, p = d.partition("=")
        disks[n] = Disk(p, a.size)
    if os.path.exists(a.socket):
        os.unlink(a.socket)
    srv = await asyncio.start_unix_server(Server(disks).handle, path=a.socket)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
