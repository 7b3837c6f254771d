#!/usr/bin/env python3
"""cuemu_pp.py - rewrite a CUDA source for cuemu (tests/cuemu/README.md): every kernel launch
`name<<<grid, block[, shmem[, stream]]>>>(args)` becomes
`cuemu::cfg(grid, block[, shmem[, stream]]).run(name, args)`; nothing else changes.

usage: cuemu_pp.py IN.cu OUT.cpp
"""
import re
import sys

LAUNCH = re.compile(r"([A-Za-z_][A-Za-z0-9_:]*(?:\s*<[^<>;()]*>)?)\s*<<<([^;\"]*?)>>>\s*\(", re.S)


def rewrite(src):
    out, pos, n = [], 0, 0
    for m in LAUNCH.finditer(src):
        out.append(src[pos:m.start()])
        out.append("cuemu::cfg(%s).run(%s, " % (m.group(2).strip(), m.group(1).strip()))
        pos = m.end()
        n += 1
    out.append(src[pos:])
    return "".join(out), n


def main():
    src = open(sys.argv[1]).read()
    text, n = rewrite(src)
    if LAUNCH.search(text) or re.search(r"<<<[^\"]*>>>\s*\(", text):
        sys.exit("cuemu_pp: %s: a launch was not rewritten" % sys.argv[1])
    with open(sys.argv[2], "w") as f:
        f.write('#line 1 "%s"\n' % sys.argv[1])
        f.write(text)
    print("cuemu_pp: %s: %d launches" % (sys.argv[1], n))


if __name__ == "__main__":
    main()
