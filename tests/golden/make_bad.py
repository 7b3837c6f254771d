#!/usr/bin/env python3
"""Derive the bad golden files from v1_small.kvt (run from tests/golden/ after regenerating
it). Each one exercises one check of the reader; test_trace_golden.c lists the expected
status of each."""
import struct, zlib

g = open("v1_small.kvt", "rb").read()
jl = struct.unpack_from("<I", g, 20)[0]

def save(name, b):
    open(name, "wb").write(bytes(b))

b = bytearray(g); b[8] ^= 0xFF; save("bad_magic.kvt", b)
b = bytearray(g); struct.pack_into("<H", b, 12, 2); save("future_version.kvt", b)
b = bytearray(g); struct.pack_into("<I", b, 20, 0xFFFFFFF0); save("oversized_length.kvt", b)
b = bytearray(g); b[30] ^= 1; save("bad_header_crc.kvt", b)
b = bytearray(g); b[24] = ord("[")
struct.pack_into("<I", b, 24 + jl, zlib.crc32(bytes(b[8:24 + jl])))
save("malformed_json.kvt", b)
# cut in the middle of the fifth record's payload
off = 8 + 16 + jl + 4
for _ in range(4):
    comp = struct.unpack_from("<Q", g, off + 56)[0]
    off += 96 + comp
save("truncated_record.kvt", g[:off + 96 + 10])
