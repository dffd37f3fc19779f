#!/usr/bin/env python3
"""Minimal QMP client (python3 stdlib only).

    q = QMP("/path/qmp.sock"); q.cmd("query-status") -> {"running": True, ...}

Every read has a timeout, so a hung qemu cannot hang the harness. Events are
kept in q.events. Also a CLI: qmp.py SOCK COMMAND ['{json args}'].
"""
import json
import socket
import sys
import time


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=30.0, connect_timeout=15.0):
        self.path = path
        self.timeout = timeout
        self.events = []
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"cannot connect to QMP socket {path}")
                time.sleep(0.1)
        self.buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"unexpected QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise QMPError(f"QMP read timed out on {self.path}") from None
            if not chunk:
                raise QMPError(f"QMP connection closed ({self.path})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            resp = self._read()
            if "event" in resp:
                self.events.append(resp)
                continue
            if "error" in resp:
                raise QMPError(f"{name}: {resp['error'].get('desc', resp['error'])}")
            return resp.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    q = QMP(sys.argv[1])
    print(json.dumps(q.cmd(sys.argv[2], **args), indent=2))


if __name__ == "__main__":
    main()
