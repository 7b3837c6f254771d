#!/usr/bin/python3
"""test_format_spec.py - traces/FORMAT.md against the files kvtrace writes.

FORMAT.md promises that a reader written from it alone reads every file kvtrace writes.
tests/oracle/format_reader.py is such a reader (written from FORMAT.md only: it imports
nothing of kvtrace). This test reads real traces with it and with kvtrace (the Python binding
python/kvtrace over libkvtrace.so, and the CLI's `verify` and `info --json`) and requires
that they agree:

  * every (layer, kind) tensor assembled by the reader equals, bit for bit and in the stored
    dtype, `kvtrace.open(path).read(kind, layer)`; the records (every header field and file
    offset), the token tables, the JSON header and the meta_json objects are equal;
  * `kvtrace info --json`: header, format_version, "complete" (index vs scan), records and
    raw bytes per kind, decode steps captured;
  * `kvtrace verify` and the binding's verify(): intact/damaged record counts, lost tail
    bytes, the overall verdict.

Traces: traces/samples/stories260K.kvt (f32, a real capture), tests/golden/v1_small.kvt,
`kvtrace synth` tiny and tiny-vl (M-RoPE positions) in bf16, f16 and f32 with and without
Q_all, llama3-8b-shaped synth whose K/V/Q_all are split along heads, a capture-llama2c trace
with 4-step decode chunks (decode tensors split along tokens) and kvzip_score, a trace written
through kvtrace.TraceWriter (a head larger than 4 MiB split along tokens, token_text split along
tokens, two meta_json records, mixed dtypes); copies cut short in a record's payload, in a
record header, at a record boundary, in the index and in the trailer (the reader's scan must
recover exactly the complete records); copies with one payload byte or one record-header
byte flipped (the reader's checksum checks must catch them, with the index and with the
scan, as kvtrace does); tests/golden's damaged files (both readers refuse them, for the same
reason); copies patched to a newer Version_Major or Version_Minor, an unknown kind, filter or
dtype (FORMAT.md "Versions", "Kinds": what a reader skips or refuses).

Finished kvtrace files are also checked against FORMAT.md's own statements (conformance()):
reserved fields zero, frames back to back, the Kinds table's dtypes, layers and shapes,
Filter 1 on every dtype wider than a byte, `zstd -t` and `zstd -d` as the Overview says.
Where FORMAT.md is silent about something kvtrace does the test prints a note.

Environment (set by ctest, tests/cmake/oracle.cmake): KVT_BIN (the kvtrace CLI), KVT_LIB
(libkvtrace.so), KVT_SOURCE_ROOT (repository). Exit 77 when NumPy, the zstd tool, the CLI or
the binding is missing; 1 on any disagreement (each one printed).
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("KVT_SOURCE_ROOT") or os.path.dirname(os.path.dirname(HERE))


def skip(why):
    print("SKIP: " + why)
    sys.exit(77)


try:
    import numpy as np
except ImportError:
    skip("numpy is not installed for " + sys.executable)
if shutil.which("zstd") is None:
    skip("the zstd command-line tool is not installed")
BIN = os.environ.get("KVT_BIN") or os.path.join(ROOT, "build", "bin", "kvtrace")
if not os.path.isfile(BIN) or not os.access(BIN, os.X_OK):
    skip("KVT_BIN does not name the kvtrace CLI (%s)" % BIN)
LIB = os.environ.get("KVT_LIB")
if not LIB or not os.path.exists(LIB):
    skip("KVT_LIB does not name libkvtrace.so")
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, HERE)
try:
    import kvtrace  # noqa: E402
except Exception as e:  # the binding or its library cannot be loaded
    skip("the kvtrace Python binding cannot be imported: %s" % e)
import format_reader as fr  # noqa: E402

SAMPLE = os.path.join(ROOT, "traces", "samples", "stories260K.kvt")
GOLDEN = os.path.join(ROOT, "tests", "golden", "v1_small.kvt")
MODEL = os.path.join(ROOT, "models", "stories260K.bin")

# The stored dtype of each FORMAT.md dtype, as kvtrace's binding returns it (python/README.md).
BINDING_DTYPE = {"f16": np.float16, "bf16": np.uint16, "f32": np.float32, "i32": np.int32,
                 "u8": np.uint8}


class Report:
    """Collects disagreements; every check names the trace and what disagreed."""

    def __init__(self):
        self.failures = []
        self.checks = 0

    def check(self, ok, trace, what):
        self.checks += 1
        if not ok:
            self.failures.append("%s: %s" % (trace, what))
            print("  FAIL %s" % what)
        return ok

    def equal(self, mine, theirs, trace, what):
        return self.check(mine == theirs, trace, "%s: format_reader %r, kvtrace %r" % (
            what, short(mine), short(theirs)))


def short(x):
    s = repr(x)
    return s if len(s) < 300 else s[:300] + "..."


def cli(*args):
    p = subprocess.run([BIN] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    return p.returncode, p.stdout + p.stderr


def verify_counts(text):
    """(intact, damaged) from `kvtrace verify`'s summary line."""
    m = re.search(r": OK \((\d+) records", text)
    if m:
        return int(m.group(1)), 0
    m = re.search(r"(\d+) records intact, (\d+) damaged", text)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


def record_tuple(r):
    return (r.kind_code, r.layer, r.head_begin, r.head_end, r.tok_begin, r.tok_end, r.dim,
            r.dtype, r.filter, r.seq, r.raw_bytes, r.comp_bytes, r.offset)


def binding_record_tuple(r):
    return (r["kind_code"], r["layer"], r["head_begin"], r["head_end"], r["tok_begin"],
            r["tok_end"], r["dim"], r["dtype"], r["filter"], r["seq"], r["raw_bytes"],
            r["comp_bytes"], r["file_offset"])


def same_array(mine, theirs):
    """Bit-for-bit equality, dtype and shape included; returns None or what differs."""
    theirs = np.asarray(theirs)
    if mine.dtype != theirs.dtype:
        return "dtype %s vs %s" % (mine.dtype, theirs.dtype)
    if mine.shape != theirs.shape:
        return "shape %s vs %s" % (mine.shape, theirs.shape)
    a = np.ascontiguousarray(mine).view(np.uint8).reshape(mine.size, -1)
    b = np.ascontiguousarray(theirs).view(np.uint8).reshape(theirs.size, -1)
    if not np.array_equal(a, b):
        n = int(np.count_nonzero((a != b).any(axis=1)))
        return "%d of %d elements differ in their bits" % (n, mine.size)
    return None


def compare(rep, name, path, expect_complete=None):
    """Everything the reader and kvtrace say about one trace must agree."""
    print("%s (%s, %d bytes)" % (name, os.path.basename(path), os.path.getsize(path)))
    try:
        ours = fr.Trace(path)
    except Exception as e:
        rep.check(False, name, "format_reader cannot open it: %s" % e)
        traceback.print_exc()
        return None
    theirs = kvtrace.open(path)
    try:
        _compare(rep, name, path, ours, theirs, expect_complete)
    except Exception as e:
        rep.check(False, name, "format_reader raised %s: %s" % (type(e).__name__, e))
        traceback.print_exc()
    finally:
        theirs.close()
    return ours


def _compare(rep, name, path, ours, theirs, expect_complete):
    rc, out = cli("info", "--json", path)
    if not rep.check(rc == 0, name, "kvtrace info --json exited %d: %s" % (rc, out[-500:])):
        return
    info = json.loads(out)

    # File header, completeness (index vs scan).
    rep.equal(ours.header, theirs.header, name, "JSON header (binding)")
    rep.equal(ours.header, info["header"], name, "JSON header (info --json)")
    rep.equal(list(ours.version), info["format_version"], name, "format_version")
    rep.equal(ours.complete, info["complete"], name, "complete (opened by the index)")
    if expect_complete is not None:
        rep.equal(ours.complete, expect_complete, name, "complete, as the test made the file")

    # Records: every header field and where the record is.
    mine = [record_tuple(r) for r in ours.records]
    their = [binding_record_tuple(r) for r in theirs.records]
    rep.equal(len(mine), len(their), name, "number of records")
    for i, (a, b) in enumerate(zip(mine, their)):
        rep.check(a == b, name, "record %d: format_reader %r, kvtrace %r" % (i, a, b))

    # Tensors of every layer, assembled from their records.
    keys = sorted({(r.kind, r.layer) for r in ours.records if r.kind in fr.LAYER_KINDS})
    their_keys = sorted({(r["kind"], r["layer"]) for r in theirs.records
                         if r["kind"] in fr.LAYER_KINDS})
    rep.equal(keys, their_keys, name, "(kind, layer) tensors present")
    for kind, layer in keys:
        # A tensor with a damaged record: both readers must refuse it.
        try:
            a = ours.tensor(kind, layer)
        except fr.FormatError as e:
            a = e
        try:
            b = theirs.read(kind, layer)
        except kvtrace.TraceError as e:
            b = e
        if isinstance(a, Exception) or isinstance(b, Exception):
            rep.check(isinstance(a, Exception) and isinstance(b, Exception), name,
                      "%s layer %d: format_reader %s, kvtrace %s" % (
                          kind, layer, "refuses (%s)" % a if isinstance(a, Exception)
                          else "reads it", "refuses (%s)" % b if isinstance(b, Exception)
                          else "reads it"))
            continue
        why = same_array(a, b)
        rep.check(why is None, name, "%s layer %d: %s" % (kind, layer, why))
        dtype = ours.records_of(kind, layer)[0].dtype
        rep.check(a.dtype == BINDING_DTYPE[dtype], name,
                  "%s layer %d: stored dtype %s read as %s" % (kind, layer, dtype, a.dtype))

    # Token tables.
    tabs, their_tabs = ours.tables(), theirs.tokens
    for key in sorted(set(tabs) | {k for k, v in their_tabs.items() if v is not None}):
        a, b = tabs.get(key), their_tabs.get(key)
        if a is None or b is None:
            rep.check(False, name, "token table %s: format_reader %s, kvtrace %s" % (
                key, "absent" if a is None else "present", "absent" if b is None
                else "present"))
        elif key == "token_text":
            rep.equal(a, list(b), name, "token_text")
        else:
            why = same_array(a, b)
            rep.check(why is None, name, "token table %s: %s" % (key, why))

    # meta_json objects, decode steps.
    meta = ours.meta()
    rep.equal(meta, theirs.meta, name, "meta_json objects")
    planned, captured = ours.decode_steps()
    ds = info.get("decode_steps", {})
    rep.equal(planned, ds.get("planned"), name, "decode steps planned")
    rep.equal(captured, ds.get("captured"), name, "decode steps captured")

    # info --json: records and raw bytes per kind.
    per_kind = {}
    for r in ours.records:
        if r.kind_code not in fr.KINDS:
            continue  # info --json lists the kinds it knows
        n, raw = per_kind.get(r.kind, (0, 0))
        per_kind[r.kind] = (n + 1, raw + r.raw_bytes)
    their_kind = {k: (v["records"], v["raw_bytes"]) for k, v in info["tensors"].items()}
    rep.equal(per_kind, their_kind, name, "records and raw bytes per kind (info --json)")

    # Checksums and completeness: kvtrace verify (CLI) and the binding's verify().
    v = ours.verify()
    intact = v["n_records"] - len(v["damaged"])
    vrc, vout = cli("verify", path)
    counts = verify_counts(vout)
    rep.check(counts is not None, name, "cannot parse kvtrace verify's output: %r" % vout)
    if counts:
        rep.equal((intact, len(v["damaged"])), counts, name,
                  "records intact, damaged (kvtrace verify)")
    rep.equal(v["ok"], vrc == 0, name, "verdict intact (kvtrace verify exit %d)" % vrc)
    bv = theirs.verify()
    rep.equal((intact, len(v["damaged"]), v["ok"]),
              (bv["n_records_ok"], bv["n_records_bad"], bv["ok"]),
              name, "records ok, bad, ok (binding verify())")
    # FORMAT.md "Reading" 3: an Index or Trailer frame, whole or cut, holds no record, so a
    # scan stopped there has lost nothing
    rep.equal(v["tail_bytes_lost"], bv["tail_bytes_lost"], name,
              "incomplete tail bytes lost (binding verify())")
    if ours.scan_stop == "index":
        rep.equal(bv["tail_bytes_lost"], 0, name, "nothing lost when the cut is in the index")
    if not v["ok"]:
        print("  format_reader verify: " + "; ".join(v["problems"]))
        print("  kvtrace verify: " + " | ".join(vout.strip().splitlines()))


# Kinds table of FORMAT.md: allowed dtypes, the header fields giving the head and token
# counts ("Hkv", "Hq", 1 or "P"; "T", "W", "G"), and Dim ("D" or 1).
FLOAT = {"f16", "bf16", "f32"}
KIND_SPEC = {
    "K": (FLOAT, "Hkv", "T", "D"), "V": (FLOAT, "Hkv", "T", "D"),
    "Q_window": (FLOAT, "Hq", "W", "D"), "Q_decode": (FLOAT, "Hq", "G", "D"),
    "K_decode": (FLOAT, "Hkv", "G", "D"), "V_decode": (FLOAT, "Hkv", "G", "D"),
    "attn_colsum": ({"f32"}, "Hq", "T", 1), "Q_all": (FLOAT, "Hq", "T", "D"),
    "kvzip_score": ({"f32"}, "Hkv", "T", 1),
    "token_ids": ({"i32"}, 1, "T", 1), "modality": ({"u8"}, 1, "T", 1),
    "positions": ({"i32"}, "P", "T", 1), "decode_token_ids": ({"i32"}, 1, "G", 1),
    "token_text": ({"u8"}, 1, None, 1), "meta_json": ({"u8"}, 1, None, 1),
}
MAX_RECORD_BYTES = 4 << 20


def conformance(rep, name, path, ours):
    """A finished kvtrace file against FORMAT.md's statements about what files contain
    (beyond what a reader needs): reserved fields zero, frames back to back, the Kinds
    table's dtypes, layers and shapes, the zstd-tool claims of the Overview. Statements
    about the writer's policy (when it splits records) are printed as notes, not failures."""
    h = ours.header
    model = h.get("model", {})
    # 1.1 from the writer now; 1.0 in files written before kind 9 (tests/golden/v1_small.kvt)
    rep.check(ours.version in ((1, 0), (1, fr.VERSION_MINOR)), name,
              "Version_Major.Version_Minor %s" % (ours.version,))
    rep.equal(ours.file_flags, 0, name, "File_Header_Frame Flags (reserved)")
    if "format_version" in h:
        rep.equal(tuple(h["format_version"]), ours.version, name,
                  "JSON format_version vs the file header")
    # Frames back to back: header, records, index, trailer.
    ends = [ours.records_start] + [r.end for r in ours.records]
    rep.equal([r.offset for r in ours.records], ends[:-1], name, "records back to back")
    rep.equal(ends[-1], ours.index_offset, name, "Index_Frame right after the last record")
    rep.equal(ours.index_offset + 8 + 16 + 96 * len(ours.records) + 4, ours.size - 32, name,
              "Trailer_Frame right after the Index_Frame")
    dims = {"Hkv": model.get("n_kv_heads"), "Hq": model.get("n_q_heads"),
            "D": model.get("head_dim"), "T": h.get("n_tokens"), "W": h.get("window")}
    rope = model.get("rope", {}).get("type")
    for i, r in enumerate(ours.records):
        what = "record %d (%s layer %d)" % (r.seq, r.kind, r.layer)
        rep.check(r.seq == i, name, what + ": Seq is not its position %d" % i)
        rep.check(r.flags == 0 and r.reserved == bytes(24), name,
                  what + ": Flags or Reserved not zero")
        if r.kind not in KIND_SPEC:
            rep.check(False, name, what + ": unknown kind %d" % r.kind_code)
            continue
        dtypes, _, _, dim = KIND_SPEC[r.kind]
        rep.check(r.dtype in dtypes, name, "%s: dtype %s, Kinds table says %s" % (
            what, r.dtype, sorted(dtypes)))
        if r.kind in fr.LAYER_KINDS:
            rep.check(0 <= r.layer < model.get("n_layers", 0), name, what + ": layer")
        else:
            rep.check(r.layer == -1, name, what + ": a table's layer is not -1")
        rep.equal(r.dim, dims["D"] if dim == "D" else dim, name, what + ": Dim")
        size = fr.DTYPES[r.dtype_code][1]
        rep.equal(r.filter, 1 if size > 1 else 0, name,
                  what + ": Filter (\"kvtrace applies it to every dtype wider than one byte\")")
        if r.raw_bytes > MAX_RECORD_BYTES:
            print("  note: %s holds %d bytes, above max_record_bytes 4 MiB" % (what, r.raw_bytes))
    small_token_splits = []
    for kind, layer in sorted({(r.kind, r.layer) for r in ours.records}):
        if kind not in KIND_SPEC or kind == "meta_json":
            continue
        _, hdim, tdim, _ = KIND_SPEC[kind]
        recs = ours.records_of(kind, layer)
        heads = max(r.head_end for r in recs)
        toks = max(r.tok_end for r in recs)
        what = "%s layer %d [%d, %d]" % (kind, layer, heads, toks)
        if hdim == "P":
            rep.check(heads == (3 if rope == "mrope" else 1), name,
                      "%s: P must be 3 for M-RoPE, else 1 (rope %s)" % (what, rope))
        elif hdim is not None:
            rep.equal(heads, dims[hdim] if isinstance(hdim, str) else hdim, name,
                      what + ": heads (" + str(hdim) + ")")
        if tdim == "G":
            rep.check(toks <= h.get("n_decode", 0), name, what + ": more than n_decode steps")
        elif tdim is not None:
            rep.equal(toks, dims[tdim], name, what + ": tokens (" + tdim + ")")
        # The writer's split policy: along tokens only "for a very large head" (> 4 MiB).
        head_bytes = toks * recs[0].dim * fr.DTYPES[recs[0].dtype_code][1]
        if any(r.tok_end - r.tok_begin < toks for r in recs) and head_bytes <= MAX_RECORD_BYTES:
            small_token_splits.append("%s %d (%d records, %d bytes a head)" % (
                kind, layer, len(recs), head_bytes))
    if small_token_splits:
        print("  note: split along tokens although no head exceeds 4 MiB: " +
              ", ".join(small_token_splits))
    tabs = ours.tables()
    if "modality" in tabs:
        rep.check(int(tabs["modality"].max(initial=0)) <= 3, name, "modality values in 0..3")
    if "token_text" in tabs:
        rep.equal(len(tabs["token_text"]), h.get("n_tokens"), name, "token_text strings")
    # Overview: `zstd -t` tests a trace and `zstd -d` prints the concatenated stored payloads.
    p = subprocess.run(["zstd", "-t", "-q", path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    rep.check(p.returncode == 0, name, "zstd -t: %s" % p.stderr.decode(errors="replace"))
    p = subprocess.run(["zstd", "-d", "-c", "-q", path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    rep.check(p.returncode == 0 and p.stdout == b"".join(
        ours.read_payload(r) for r in ours.records), name,
        "zstd -d does not print the concatenated stored payloads")


# ---------------------------------------------------------------------------------------
# The traces
# ---------------------------------------------------------------------------------------
def make_synth(rep, work, name, *args):
    path = os.path.join(work, name + ".kvt")
    rc, out = cli("synth", "-o", path, "--force", *args)
    rep.check(rc == 0, name, "kvtrace synth %s exited %d: %s" % (" ".join(args), rc, out))
    return path if rc == 0 else None


def make_writer_trace(work):
    """Written through kvtrace.TraceWriter: splits the synth and capture traces do not have
    (one head above 4 MiB split along tokens, a long token_text), two meta_json records,
    mixed dtypes, M-RoPE-style positions [3, T]."""
    path = os.path.join(work, "writer.kvt")
    rng = np.random.default_rng(7)
    T, D = 36000, 32
    header = {"format": "kvtrace", "format_version": [1, 1], "created_by": "test_format_spec",
              "endianness": "little",
              # an escape sequence in a string: info's text must not pass it to the terminal
              "model": {"name": "format-spec\x1b[31m\u009b", "arch": "llama", "n_layers": 1,
                        "n_q_heads": 4, "n_kv_heads": 2, "head_dim": D,
                        "rope": {"type": "mrope", "theta": 1e6}},
              "kv_dtype": "f32", "n_tokens": T, "window": 8, "n_decode": 0,
              "engine": {"name": "numpy", "version": "0"}, "gpu": None,
              "capture": {"note": "caf\u00e9 \u4e2d"}}
    # One string per prompt token, > 4 MiB in all (split along tokens), non-ASCII.
    text = [("t%d" % i if i % 3 else "\u4e2d%d" % i) + "\u00e9" * 60 for i in range(T)]
    blob = np.frombuffer("".join(s + "\0" for s in text).encode("utf-8"), np.uint8)
    assert blob.size > 4 << 20
    with kvtrace.TraceWriter(path, header) as w:
        w.append("token_ids", np.arange(T) % 32000)
        w.append("positions", np.stack([np.arange(T), np.arange(T) // 7, np.arange(T) % 7]))
        w.append("token_text", blob)
        w.append("K", rng.standard_normal((2, T, D)).astype(np.float32), layer=0)
        w.append("V", rng.standard_normal((2, T, D)).astype(np.float32), layer=0,
                 dtype="bf16")
        w.append("Q_window", rng.standard_normal((4, 8, D)).astype(np.float32), layer=0,
                 dtype="f16")
        w.append("attn_colsum", rng.random((4, T, 1)).astype(np.float32), layer=0)
        w.append_json({"first": 1, "text": "\u00e9", "\u009b2Jkey": 1})  # info: no raw C1
        w.append_json({"second": [1, 2, {"x": None}]})
    return path


def cut(src, dst, size):
    with open(src, "rb") as f:
        data = f.read(size)
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def flip(src, dst, offset):
    with open(src, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0xFF
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return dst


def truncation_cases(rep, work, name, path):
    """Copies of a finished trace cut short: the scan must find exactly the records that
    lie completely before the cut (and kvtrace must agree, which compare() checks)."""
    full = fr.Trace(path)
    recs = full.records
    index_offset = recs[-1].end
    size = os.path.getsize(path)
    cuts = [
        ("mid-payload", recs[len(recs) // 2].payload_offset + recs[len(recs) // 2].comp_bytes // 2),
        ("mid-header", recs[len(recs) // 3].offset + 50),
        ("record boundary", recs[2 * len(recs) // 3].offset),
        ("in the index", index_offset + 100),
        ("in the trailer", size - 10),
    ]
    for what, at in cuts:
        cname = "%s cut %s at %d" % (name, what, at)
        dst = cut(path, os.path.join(work, "cut_%d.kvt" % at), at)
        ours = compare(rep, cname, dst, expect_complete=False)
        if ours is None:
            continue
        expect = [record_tuple(r) for r in recs if r.end <= at]
        rep.check([record_tuple(r) for r in ours.records] == expect, cname,
                  "scan recovered %d records, %d lie completely before the cut" % (
                      len(ours.records), len(expect)))


def corruption_cases(rep, work, name, path):
    """One byte flipped in a payload, then in a record header; with the index, and in a
    truncated copy (scan). The reader's checksum checks must catch it as FORMAT.md says."""
    full = fr.Trace(path)
    recs = full.records
    victim = recs[len(recs) // 2]

    # A payload byte: Payload_Crc (FORMAT.md Reading, step 4) must catch it.
    dst = flip(path, os.path.join(work, "flip_payload.kvt"),
               victim.payload_offset + victim.comp_bytes // 2)
    cname = "%s payload byte of record %d flipped" % (name, victim.seq)
    ours = compare(rep, cname, dst, expect_complete=True)
    if ours is not None:
        try:
            ours.read_record(ours.records[victim.seq])
            rep.check(False, cname, "format_reader read the damaged payload without error")
        except fr.ChecksumError as e:
            rep.check("Payload_Crc" in str(e), cname, "caught, but not by Payload_Crc: %s" % e)
        rep.equal(ours.verify()["damaged"], [victim.seq], cname, "damaged records")

    # The same, in a copy cut short after it (no index: the scan keeps the record, whose
    # header is intact; reading it must fail).
    dst2 = cut(dst, os.path.join(work, "flip_payload_cut.kvt"), recs[-1].end - 5)
    cname2 = cname + ", cut short"
    ours = compare(rep, cname2, dst2, expect_complete=False)
    if ours is not None:
        rep.equal(ours.verify()["damaged"], [victim.seq], cname2, "damaged records")

    # A record-header byte (Dim, inside the Header_Crc range).
    dst = flip(path, os.path.join(work, "flip_header.kvt"), victim.offset + 36)
    cname = "%s header byte of record %d flipped" % (name, victim.seq)
    ours = compare(rep, cname, dst, expect_complete=True)
    if ours is not None:
        rep.equal(ours.verify()["damaged"], [victim.seq], cname, "damaged records")

    # The same, cut short: the scan skips the damaged header and resumes at the next
    # (0x184D2A5B, 88) pair, so it loses exactly that record.
    dst2 = cut(dst, os.path.join(work, "flip_header_cut.kvt"), recs[-1].end - 5)
    cname2 = cname + ", cut short"
    ours = compare(rep, cname2, dst2, expect_complete=False)
    if ours is not None:
        expect = [record_tuple(r) for r in recs[:-1] if r.seq != victim.seq]
        rep.check([record_tuple(r) for r in ours.records] == expect, cname2,
                  "scan kept %s, expected every complete record but %d" % (
                      [r.seq for r in ours.records], victim.seq))


def patched(src, dst, version=None, record=None, field=None, value=None):
    """A copy of a finished trace with the file header's version, or one field of one
    record's header (on disk and in its index copy), changed, every crc32 recomputed
    (FORMAT.md layouts), so that only the changed value is new."""
    t = fr.Trace(src)
    d = bytearray(t.data)
    if version is not None:
        struct.pack_into("<HH", d, 12, *version)
        j = struct.unpack_from("<I", d, 20)[0]
        struct.pack_into("<I", d, 24 + j, fr.crc32(bytes(d[8:24 + j])))
    if record is not None:
        off, fmt = {"Kind": (4, "<H"), "Dtype": (6, "<B"), "Filter": (7, "<B")}[field]
        rec = t.records[record]
        for user in (rec.offset + 8, t.index_offset + 24 + 96 * record + 8):
            struct.pack_into(fmt, d, user + off, value)
            struct.pack_into("<I", d, user + 84, fr.crc32(bytes(d[user:user + 84])))
        i, n = t.index_offset, len(t.records)
        struct.pack_into("<I", d, i + 24 + 96 * n, fr.crc32(bytes(d[i + 8:i + 24 + 96 * n])))
    with open(dst, "wb") as f:
        f.write(bytes(d))
    return dst


def crafted_cases(rep, work, name, path):
    """FORMAT.md's rules for readers of other versions, on patched copies: a newer
    Version_Major is refused before the checksum check; a newer Version_Minor is read; a
    record of an unknown kind is skipped (the others read); an unknown filter is refused for
    that record only; an unknown dtype (not covered by "Versions") invalidates the header and
    so the index: the scan recovers the other records."""
    t = fr.Trace(path)
    victim = [r.seq for r in t.records if r.kind == "Q_decode"][0]

    # Version_Major 2, Header_Crc left stale: a version error, not a checksum error.
    dst = os.path.join(work, "major2.kvt")
    with open(path, "rb") as f:
        d = bytearray(f.read())
    struct.pack_into("<H", d, 12, 2)
    with open(dst, "wb") as f:
        f.write(bytes(d))
    cname = "%s Version_Major 2" % name
    print(cname)
    try:
        fr.Trace(dst)
        rep.check(False, cname, "format_reader opened it")
    except fr.VersionError:
        pass
    except fr.FormatError as e:
        rep.check(False, cname, "format_reader refused it, but not for its version: %s" % e)
    try:
        kvtrace.open(dst).close()
        rep.check(False, cname, "kvtrace opened it")
    except kvtrace.TraceError as e:
        rep.check(e.status_name == "KVT_ERR_VERSION", cname,
                  "kvtrace's error %s, expected KVT_ERR_VERSION" % e.status_name)
    rc, out = cli("verify", dst)
    rep.check(rc == 2 and "version" in out, cname, "kvtrace verify: exit %d, %r" % (rc, out))

    compare(rep, "%s Version_Minor 2" % name,
            patched(path, os.path.join(work, "minor2.kvt"), version=(1, 2)),
            expect_complete=True)
    ours = compare(rep, "%s record %d of unknown Kind 40" % (name, victim),
                   patched(path, os.path.join(work, "kind40.kvt"), record=victim,
                           field="Kind", value=40), expect_complete=True)
    if ours is not None:
        rep.check(ours.verify()["ok"], name, "a record of unknown kind made the trace damaged")
    ours = compare(rep, "%s record %d with unknown Filter 2" % (name, victim),
                   patched(path, os.path.join(work, "filter2.kvt"), record=victim,
                           field="Filter", value=2), expect_complete=True)
    if ours is not None:
        rep.equal(ours.verify()["damaged"], [victim], name, "records refused for Filter 2")
    ours = compare(rep, "%s record %d with unknown Dtype 6" % (name, victim),
                   patched(path, os.path.join(work, "dtype6.kvt"), record=victim,
                           field="Dtype", value=6), expect_complete=False)
    if ours is not None:
        rep.equal([r.seq for r in ours.records], [r.seq for r in t.records if r.seq != victim],
                  name, "records recovered around the one of unknown Dtype")


# tests/golden's damaged files (tests/golden/make_bad.py): the error each must give, in the
# reader's terms and in kvtrace's.
GOLDEN_REFUSED = {
    "bad_header_crc.kvt": (fr.ChecksumError, "KVT_ERR_CHECKSUM"),
    "bad_magic.kvt": (fr.FormatError, "KVT_ERR_CORRUPT"),
    "future_version.kvt": (fr.VersionError, "KVT_ERR_VERSION"),
    "malformed_json.kvt": (fr.FormatError, "KVT_ERR_CORRUPT"),
    "oversized_length.kvt": (fr.FormatError, "KVT_ERR_CORRUPT"),
}


def golden_damaged(rep):
    """Files neither reader may open, and tests/golden/truncated_record.kvt (scan)."""
    gdir = os.path.dirname(GOLDEN)
    for fname, (mine, theirs) in sorted(GOLDEN_REFUSED.items()):
        path, cname = os.path.join(gdir, fname), "golden " + fname
        print(cname)
        try:
            fr.Trace(path)
            rep.check(False, cname, "format_reader opened it")
        except fr.FormatError as e:
            rep.check(type(e) is mine, cname, "format_reader: %s %s, expected %s" % (
                type(e).__name__, e, mine.__name__))
        try:
            kvtrace.open(path).close()
            rep.check(False, cname, "kvtrace opened it")
        except kvtrace.TraceError as e:
            rep.check(e.status_name == theirs, cname, "kvtrace's error %s, expected %s" % (
                e.status_name, theirs))
        rc, out = cli("verify", path)
        rep.equal(rc, 2, cname, "kvtrace verify exit status (not a readable trace)")
    compare(rep, "golden truncated_record.kvt", os.path.join(gdir, "truncated_record.kvt"),
            expect_complete=False)


def selftest_crc(rep):
    rep.equal(fr.crc32(b"123456789"), 0xCBF43926, "crc32", "FORMAT.md's check value")


def main():
    rep = Report()
    work = tempfile.mkdtemp(prefix="kvt_fmt_spec_")
    try:
        selftest_crc(rep)
        golden_damaged(rep)
        traces = [("stories260K sample", SAMPLE), ("golden v1_small", GOLDEN)]
        for name, args in [
            ("synth tiny bf16", ["--shape", "tiny", "--tokens", "150", "--dtype", "bf16"]),
            ("synth tiny f16 q-all", ["--shape", "tiny", "--tokens", "211", "--dtype", "f16",
                                      "--q-all"]),
            ("synth tiny-vl bf16 q-all", ["--shape", "tiny-vl", "--tokens", "300", "--dtype",
                                          "bf16", "--q-all", "--decode", "5"]),
            ("synth tiny-vl f16", ["--shape", "tiny-vl", "--tokens", "100", "--dtype", "f16",
                                   "--window", "7"]),
            ("synth tiny-vl f32 no decode", ["--shape", "tiny-vl", "--tokens", "123", "--dtype",
                                             "f32", "--decode", "0", "--window", "123"]),
            ("synth llama3-8b head splits", ["--shape", "llama3-8b", "--layers", "1",
                                             "--tokens", "3000", "--dtype", "bf16", "--q-all",
                                             "--colsum", "off", "--decode", "2"]),
        ]:
            path = make_synth(rep, work, name.replace(" ", "_"), *args)
            if path:
                traces.append((name, path))
        cap = os.path.join(work, "capture.kvt")
        rc, out = cli("capture-llama2c", "--model", MODEL, "--tokens", "80", "--decode", "9",
                      "--decode-chunk", "4", "--window", "8", "--kvzip", "-o", cap, "--force")
        if rep.check(rc == 0, "capture-llama2c", "exited %d: %s" % (rc, out)):
            traces.append(("capture-llama2c decode chunks of 4", cap))
        wt = make_writer_trace(work)
        traces.append(("TraceWriter token splits", wt))
        rc, out = cli("info", wt)
        rep.check(rc == 0 and "\x1b" not in out and "\u009b" not in out and
                  "model      format-spec?[31m?? (llama)" in out,
                  "info", "a control byte in the header printed as it is: %r" % out[:300])

        for name, path in traces:
            ours = compare(rep, name, path, expect_complete=True)
            if ours is not None and ours.complete:
                try:
                    conformance(rep, name, path, ours)
                except Exception as e:
                    rep.check(False, name, "conformance raised %s: %s" % (type(e).__name__, e))
                    traceback.print_exc()
        if os.path.exists(cap):
            truncation_cases(rep, work, "capture", cap)
        tvl = dict(traces).get("synth tiny-vl bf16 q-all")
        if tvl:
            truncation_cases(rep, work, "tiny-vl", tvl)
            corruption_cases(rep, work, "tiny-vl", tvl)
            crafted_cases(rep, work, "tiny-vl", tvl)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n%d checks, %d disagreements" % (rep.checks, len(rep.failures)))
    for f in rep.failures:
        print("  " + f)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
