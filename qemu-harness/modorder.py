#!/usr/bin/env python3
"""Print the load order (dependencies first) of kernel modules.

Reads the `depends=` field of each module's ELF `.modinfo` section, so no
modules.dep (the kernel package ships none; depmod runs at install time) and
no kmod tools are needed on the host.

usage: modorder.py MODULES_DIR name [name...]   -> relative .ko paths, one a line
"""
import os
import struct
import sys


def modinfo(path):
    """Return the key=value strings of a module's .modinfo section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit(f"{path}: not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        base = shoff + i * shentsize
        name, _typ, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, base)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            raw = data[off:off + size]
            return [s.decode(errors="replace") for s in raw.split(b"\0") if s]
    return []


def main():
    root, wanted = sys.argv[1], sys.argv[2:]
    index = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".ko"):
                index[f[:-3].replace("-", "_")] = os.path.relpath(os.path.join(d, f), root)
    builtin = set()
    try:
        with open(os.path.join(root, "modules.builtin")) as f:
            builtin = {os.path.basename(l.strip())[:-3].replace("-", "_") for l in f if l.strip()}
    except FileNotFoundError:
        pass
    order, seen = [], set()

    def visit(name, stack):
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in stack:
            raise SystemExit(f"module dependency cycle at {name}")
        if name in builtin and name not in index:
            seen.add(name)  # built into the kernel image: nothing to load
            return
        if name not in index:
            raise SystemExit(f"module {name} not found under {root}")
        deps = []
        for kv in modinfo(os.path.join(root, index[name])):
            if kv.startswith("depends="):
                deps = [x for x in kv[len("depends="):].split(",") if x]
        for dep in deps:
            visit(dep, stack | {name})
        seen.add(name)
        order.append(index[name])

    for w in wanted:
        visit(w, set())
    print("\n".join(order))


if __name__ == "__main__":
    main()
