#!/usr/bin/python3
"""format_reader.py - an independent reader of kvtrace's .kvt trace format.

Written from traces/FORMAT.md alone (not from kvtrace's C reader or its Python binding), so
that tests/oracle/test_format_spec.py can check the document's promise that "a reader written
from it alone must read every file kvtrace writes". It is also meant to be read: it follows
FORMAT.md section by section, and every check names the section it comes from. Someone
writing a reader in another language can translate it function by function.

Dependencies: the Python standard library (struct, zlib for crc32, json), NumPy for the
tensors, and the `zstd` command-line tool as a black-box decompressor of payload frames
(the format's only compressed part). Nothing of kvtrace is imported.

    import format_reader as fr
    with fr.Trace("run.kvt") as t:
        t.header                  # the JSON header (dict)
        t.complete                # True: opened through the index; False: recovered by scan
        t.records                 # [Record] in file order
        t.tensor("K", 0)          # [heads, tokens, dim], stored dtype (bf16 as uint16 bits)
        t.tables()                # {"token_ids": [T] int32, "positions": [P, T], ...}
        t.meta()                  # [dict], one per meta_json record
        t.verify()                # {"ok": bool, "problems": [...], ...}

Errors: FormatError (the file breaks FORMAT.md), its subclass ChecksumError (a crc32 or the
zstd content checksum does not match), VersionError (another Version_Major).
"""
import io
import json
import shutil
import struct
import subprocess
import zlib

import numpy as np

# ---------------------------------------------------------------------------------------
# Constants (FORMAT.md: Overview, File_Header_Frame, Record_Header_Frame, Index_Frame,
# Trailer_Frame, Payload_Frame). All integers are little-endian.
# ---------------------------------------------------------------------------------------
SKIPPABLE_MIN, SKIPPABLE_MAX = 0x184D2A50, 0x184D2A5F  # zstd skippable-frame magics
FILE_HEADER_MAGIC = 0x184D2A5A   # Frame_Magic of the File_Header_Frame
RECORD_FRAME_MAGIC = 0x184D2A5B  # Frame_Magic of a Record_Header_Frame
INDEX_FRAME_MAGIC = 0x184D2A5D   # Frame_Magic of the Index_Frame
TRAILER_FRAME_MAGIC = 0x184D2A5F  # Frame_Magic of the Trailer_Frame
ZSTD_FRAME_MAGIC = 0xFD2FB528    # an ordinary zstd frame (Payload_Frame)

FILE_MAGIC = 0x5254564B   # "KVTR"
REC_MAGIC = 0x4352564B    # "KVRC"
INDEX_MAGIC = 0x5849564B  # "KVIX"
END_MAGIC = 0x4554564B    # "KVTE"

VERSION_MAJOR = 1   # the major version this reader implements
VERSION_MINOR = 1   # the minor version it knows (newer minors: unknown kinds are skipped)

MAX_JSON_BYTES = 64 << 20          # File_Header_Frame: Json_Bytes is at most 64 MiB
RECORD_FRAME_BYTES = 96            # Record_Header_Frame: 8-byte frame header + 88 bytes
RECORD_USER_BYTES = 88             # its Frame_Size
INDEX_ENTRY_BYTES = 96             # u64 File_Offset + the 88-byte header copy
TRAILER_BYTES = 32
MAX_DIM = 1 << 20
MIN_COMP_BYTES, MAX_COMP_BYTES = 9, 1 << 48

# Kinds (FORMAT.md: Kinds). Codes 1..9 are tensors of a layer, 16.. tables and metadata.
KINDS = {
    1: "K", 2: "V", 3: "Q_window", 4: "Q_decode", 5: "K_decode", 6: "V_decode",
    7: "attn_colsum", 8: "Q_all", 9: "kvzip_score",
    16: "token_ids", 17: "modality", 18: "positions", 19: "decode_token_ids",
    20: "token_text", 32: "meta_json",
}
KIND_CODES = {name: code for code, name in KINDS.items()}
LAYER_KINDS = {"K", "V", "Q_window", "Q_decode", "K_decode", "V_decode", "attn_colsum",
               "Q_all", "kvzip_score"}
TABLE_KINDS = {"token_ids", "modality", "positions", "decode_token_ids", "token_text"}

# Dtypes (FORMAT.md: Dtypes): code -> (name, size in bytes, NumPy dtype of the stored value).
# bf16 has no NumPy dtype: it is kept as its uint16 bit pattern (the upper half of a binary32).
DTYPES = {
    1: ("f16", 2, np.dtype("<f2")),
    2: ("bf16", 2, np.dtype("<u2")),
    3: ("f32", 4, np.dtype("<f4")),
    4: ("i32", 4, np.dtype("<i4")),
    5: ("u8", 1, np.dtype("u1")),
}

FILTER_NONE, FILTER_BYTE_PLANES = 0, 1


class FormatError(Exception):
    """The file does not follow FORMAT.md."""


class ChecksumError(FormatError):
    """A crc32 (or the payload's zstd content checksum) does not match."""


class VersionError(FormatError):
    """Version_Major differs from the one this reader implements."""


def crc32(data):
    """FORMAT.md Conventions: zlib's CRC-32 (crc32(b"123456789") == 0xCBF43926)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def u32(buf, off):
    return struct.unpack_from("<I", buf, off)[0]


def bf16_to_f32(bits):
    """bf16 bit patterns (uint16) -> float32: bf16 is the upper half of a binary32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------
# Record_Header_Frame (96 bytes)
# ---------------------------------------------------------------------------------------
# Layout of the 88-byte user data (frame offsets minus 8), little-endian:
#   Rec_Magic u32, Kind u16, Dtype u8, Filter u8, Layer i32, Head_Begin u32, Head_End u32,
#   Tok_Begin u32, Tok_End u32, Dim u32, Seq u32, Flags u32, Raw_Bytes u64, Comp_Bytes u64,
#   Payload_Crc u32, Reserved 24 bytes, Header_Crc u32
RECORD_USER = struct.Struct("<IHBBiIIIIIIIQQI24sI")
assert RECORD_USER.size == RECORD_USER_BYTES


class Record:
    """One record: where it is, and the fields of its header."""

    def __init__(self, offset, user):
        (self.rec_magic, self.kind_code, self.dtype_code, self.filter, self.layer,
         self.head_begin, self.head_end, self.tok_begin, self.tok_end, self.dim, self.seq,
         self.flags, self.raw_bytes, self.comp_bytes, self.payload_crc, self.reserved,
         self.header_crc) = RECORD_USER.unpack(user)
        self.offset = offset          # of the Record_Header_Frame
        self.user = bytes(user)       # the 88 bytes, as on disk (or in the index)

    @property
    def kind(self):
        """The kind's name, or "unknown(N)" for a kind this reader does not know."""
        return KINDS.get(self.kind_code, "unknown(%d)" % self.kind_code)

    @property
    def dtype(self):
        return DTYPES[self.dtype_code][0]

    @property
    def payload_offset(self):
        return self.offset + RECORD_FRAME_BYTES

    @property
    def end(self):
        """One past the last byte of the record's Payload_Frame."""
        return self.payload_offset + self.comp_bytes

    @property
    def shape(self):
        return (self.head_end - self.head_begin, self.tok_end - self.tok_begin, self.dim)

    def __repr__(self):
        return ("Record(seq=%d %s layer=%d heads=[%d,%d) toks=[%d,%d) dim=%d %s filter=%d "
                "raw=%d comp=%d @%d)" % (self.seq, self.kind, self.layer, self.head_begin,
                                         self.head_end, self.tok_begin, self.tok_end,
                                         self.dim, self.dtype if self.dtype_code in DTYPES
                                         else "dtype%d" % self.dtype_code, self.filter,
                                         self.raw_bytes, self.comp_bytes, self.offset))


def record_header_problem(rec, file_size):
    """FORMAT.md Record_Header_Frame, "Validation a reader must do before using a header".

    Returns None for a valid header, else a one-line reason. (The frame magic and size are
    checked by the caller, which knows where the header came from.)"""
    if rec.rec_magic != REC_MAGIC:
        return "Rec_Magic 0x%08x is not KVRC" % rec.rec_magic
    # Header_Crc: crc32 of frame bytes 8..91 = the first 84 bytes of the user data.
    if crc32(rec.user[:84]) != rec.header_crc:
        return "Header_Crc mismatch"
    if rec.layer < -1:
        return "Layer %d < -1" % rec.layer
    if not rec.head_end > rec.head_begin:
        return "Head_End %d <= Head_Begin %d" % (rec.head_end, rec.head_begin)
    if not rec.tok_end > rec.tok_begin:
        return "Tok_End %d <= Tok_Begin %d" % (rec.tok_end, rec.tok_begin)
    if not 1 <= rec.dim <= MAX_DIM:
        return "Dim %d outside 1..2^20" % rec.dim
    if rec.dtype_code not in DTYPES:
        return "unknown Dtype %d" % rec.dtype_code
    size = DTYPES[rec.dtype_code][1]
    # Python integers do not overflow, so the product is exact.
    expect = ((rec.head_end - rec.head_begin) * (rec.tok_end - rec.tok_begin) * rec.dim
              * size)
    if rec.raw_bytes != expect:
        return "Raw_Bytes %d != %d" % (rec.raw_bytes, expect)
    if not MIN_COMP_BYTES <= rec.comp_bytes <= MAX_COMP_BYTES:
        return "Comp_Bytes %d outside 9..2^48" % rec.comp_bytes
    if rec.end > file_size:
        return "payload [%d, %d) runs past the end of the file (%d bytes)" % (
            rec.payload_offset, rec.end, file_size)
    return None


# ---------------------------------------------------------------------------------------
# Payload_Frame: one zstd frame, content size and content checksum flags set.
# ---------------------------------------------------------------------------------------
def zstd_frame_info(frame):
    """Walks one zstd frame's structure (RFC 8878 section 3.1.1) without decompressing it.

    Returns (content_size or None, has_checksum, frame_length). FORMAT.md says the payload is
    "exactly one zstd frame ... written with the content size and the content checksum flags
    set"; walking the blocks shows that the frame ends exactly at Comp_Bytes."""
    if len(frame) < 6 or u32(frame, 0) != ZSTD_FRAME_MAGIC:
        raise FormatError("payload does not start with the zstd frame magic 0xFD2FB528")
    fhd = frame[4]
    fcs_flag, single_segment, checksum_flag, dict_id_flag = (
        fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3)
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_id_flag]
    fcs_bytes = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if pos + fcs_bytes > len(frame):
        raise FormatError("zstd frame header runs past Comp_Bytes")
    content_size = None
    if fcs_bytes:
        content_size = int.from_bytes(frame[pos:pos + fcs_bytes], "little")
        if fcs_bytes == 2:
            content_size += 256
    pos += fcs_bytes
    while True:  # blocks: 3-byte header (Last_Block, Block_Type, Block_Size)
        if pos + 3 > len(frame):
            raise FormatError("zstd block header runs past Comp_Bytes")
        bh = int.from_bytes(frame[pos:pos + 3], "little")
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise FormatError("reserved zstd block type")
        pos += 3 + (1 if btype == 1 else bsize)  # an RLE block stores one byte
        if last:
            break
    pos += 4 if checksum_flag else 0
    if pos > len(frame):
        raise FormatError("zstd frame runs past Comp_Bytes")
    return content_size, bool(checksum_flag), pos


def zstd_decompress(frame):
    """The black-box decompressor: the zstd command-line tool, which also checks the frame's
    content checksum. Raises ChecksumError when zstd refuses the frame."""
    exe = shutil.which("zstd")
    if exe is None:
        raise RuntimeError("the zstd command-line tool is not installed")
    p = subprocess.run([exe, "-d", "-c", "-q"], input=frame, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise ChecksumError("zstd cannot decode the payload: " +
                            p.stderr.decode(errors="replace").strip())
    return p.stdout


def unfilter(raw, rec):
    """Payload_Frame, "Filter": bytes -> NumPy array [heads, tokens, dim] of the stored dtype."""
    _, size, np_dtype = DTYPES[rec.dtype_code]
    if rec.filter == FILTER_NONE:
        elements = raw
    elif rec.filter == FILTER_BYTE_PLANES:
        # decompressed byte b*n + i is byte b (0 = least significant) of element i:
        # view as [size, n] planes, transpose to [n, size] = little-endian elements.
        n = len(raw) // size
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(size, n)
        elements = planes.T.tobytes()
    else:
        raise FormatError("record %d: unknown Filter %d" % (rec.seq, rec.filter))
    return np.frombuffer(elements, dtype=np_dtype).reshape(rec.shape).copy()


# ---------------------------------------------------------------------------------------
# The trace
# ---------------------------------------------------------------------------------------
class Trace:
    """A .kvt file opened as FORMAT.md "Reading" says: file header, then the index when the
    trailer and index are valid, else the forward scan (recovery)."""

    def __init__(self, path):
        self.path = path
        with io.open(path, "rb") as f:
            self.data = f.read()  # traces in tests are small; a real reader would seek
        self.size = len(self.data)
        self.scan_notes = []       # what the recovery scan skipped or lost
        self.tail_bytes_lost = 0   # bytes of an incomplete unit at the end (scan only)
        self.scan_stop = None      # scan only: "eof", "tail", "index", "trailer", "damaged"
        self.open_problem = None   # why the index was not used (None: it was)
        self.index_offset = None   # of the Index_Frame, when the index was used
        self._read_file_header()
        try:
            self.records = self._read_index()
            self.complete = True
        except FormatError as e:
            self.open_problem = str(e)
            self.records = self._scan()
            self.complete = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.data = None

    # --- Reading, step 1: the File_Header_Frame -------------------------------------------
    def _read_file_header(self):
        d = self.data
        if self.size < 28:
            raise FormatError("file too short for a File_Header_Frame")
        if u32(d, 0) != FILE_HEADER_MAGIC:
            raise FormatError("Frame_Magic 0x%08x is not 0x184D2A5A" % u32(d, 0))
        frame_size, file_magic = u32(d, 4), u32(d, 8)
        if file_magic != FILE_MAGIC:
            raise FormatError("File_Magic 0x%08x is not KVTR" % file_magic)
        major, minor, flags, json_bytes = struct.unpack_from("<HHII", d, 12)
        # The version check comes before the checksum check (FORMAT.md "Versions").
        if major != VERSION_MAJOR:
            raise VersionError("Version_Major %d, this reader implements %d%s" % (
                major, VERSION_MAJOR, " (upgrade the reader)" if major > VERSION_MAJOR
                else ""))
        if json_bytes > MAX_JSON_BYTES:
            raise FormatError("Json_Bytes %d exceeds 64 MiB" % json_bytes)
        if frame_size != 16 + json_bytes + 4:
            raise FormatError("Frame_Size %d != 16 + Json_Bytes + 4" % frame_size)
        if 24 + json_bytes + 4 > self.size:
            raise FormatError("File_Header_Frame runs past the end of the file")
        stored_crc = u32(d, 24 + json_bytes)
        # Header_Crc covers File_Magic through Json: bytes [8, 24 + Json_Bytes).
        if crc32(d[8:24 + json_bytes]) != stored_crc:
            raise ChecksumError("File_Header_Frame: Header_Crc mismatch")
        try:
            header = json.loads(d[24:24 + json_bytes].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise FormatError("header JSON: %s" % e)
        if not isinstance(header, dict):
            raise FormatError("header JSON is not an object")
        self.version = (major, minor)
        self.file_flags = flags
        self.header = header
        self.records_start = 24 + json_bytes + 4  # the first record's header frame

    # --- Reading, step 2: Trailer_Frame and Index_Frame ------------------------------------
    def _read_index(self):
        d, size = self.data, self.size
        if size < self.records_start + TRAILER_BYTES:
            raise FormatError("no room for a Trailer_Frame")
        t = size - TRAILER_BYTES
        magic, fsize, index_offset, n_records, tcrc, end_magic = struct.unpack_from(
            "<IIQQII", d, t)
        if magic != TRAILER_FRAME_MAGIC or fsize != 24 or end_magic != END_MAGIC:
            raise FormatError("no Trailer_Frame in the last 32 bytes")
        if crc32(d[t + 8:t + 24]) != tcrc:  # bytes 8..23 of the trailer
            raise ChecksumError("Trailer_Crc mismatch")
        if not self.records_start <= index_offset <= t - 24:
            raise FormatError("Index_Offset %d outside the file" % index_offset)
        i = index_offset
        imagic, ifsize, index_magic, n, entry_bytes, reserved = struct.unpack_from(
            "<IIIIII", d, i)
        if imagic != INDEX_FRAME_MAGIC or index_magic != INDEX_MAGIC:
            raise FormatError("no Index_Frame at Index_Offset %d" % i)
        if n != n_records:
            raise FormatError("index N %d != trailer N_Records %d" % (n, n_records))
        if entry_bytes != INDEX_ENTRY_BYTES:
            raise FormatError("Entry_Bytes %d != 96" % entry_bytes)
        if ifsize != 16 + INDEX_ENTRY_BYTES * n + 4:
            raise FormatError("Index_Frame Frame_Size %d does not match N %d" % (ifsize, n))
        crc_at = i + 24 + INDEX_ENTRY_BYTES * n
        if crc_at + 4 > t:
            raise FormatError("Index_Frame runs into the trailer")
        # Index_Crc covers Index_Magic through the entries: bytes [8, 24 + 96 N).
        if crc32(d[i + 8:crc_at]) != u32(d, crc_at):
            raise ChecksumError("Index_Crc mismatch")
        records, prev = [], -1
        for e in range(n):
            at = i + 24 + INDEX_ENTRY_BYTES * e
            offset = struct.unpack_from("<Q", d, at)[0]
            rec = Record(offset, d[at + 8:at + INDEX_ENTRY_BYTES])
            why = record_header_problem(rec, size)
            if why:
                raise FormatError("index entry %d: %s" % (e, why))
            if offset <= prev:
                raise FormatError("index entry %d: offsets do not increase" % e)
            if offset < self.records_start or rec.end > index_offset:
                raise FormatError("index entry %d: record not between the file header and "
                                  "the index" % e)
            prev = offset
            records.append(rec)
        self.index_offset = index_offset
        return records

    # --- Reading, step 3: recovery by forward scan -----------------------------------------
    def _scan(self):
        """Record by record from the end of the file header. Sets scan_stop to "eof" (the
        file ends after a record), "tail" (the last unit runs past the end of the file: lost),
        "index" or "trailer" (a complete Index/Trailer frame ends the records) or "damaged"
        (a damaged unit with no record header after it)."""
        d, size = self.data, self.size
        pair = struct.pack("<II", RECORD_FRAME_MAGIC, RECORD_USER_BYTES)
        records, pos = [], self.records_start
        self.scan_stop = "eof"

        def lose_tail(what):
            self.tail_bytes_lost = size - pos
            self.scan_stop = "tail"
            self.scan_notes.append("%s at %d runs past the end of the file: last %d bytes "
                                   "lost" % (what, pos, size - pos))

        while pos < size:
            if pos + 8 > size:
                lose_tail("a frame header")
                break
            magic, fsize = u32(d, pos), u32(d, pos + 4)
            if magic in (INDEX_FRAME_MAGIC, TRAILER_FRAME_MAGIC):
                # The end of the records. An Index or Trailer frame holds no record, so one
                # cut by the end of the file loses nothing ("Reading", step 3).
                what = "the Index_Frame" if magic == INDEX_FRAME_MAGIC else "the Trailer_Frame"
                self.scan_stop = "index" if magic == INDEX_FRAME_MAGIC else "trailer"
                if pos + 8 + fsize > size:
                    self.scan_notes.append("%s at %d is cut short by the end of the file: no "
                                           "record lost" % (what, pos))
                break
            if magic == RECORD_FRAME_MAGIC and fsize == RECORD_USER_BYTES:
                if pos + RECORD_FRAME_BYTES > size:
                    lose_tail("a Record_Header_Frame")
                    break
                rec = Record(pos, d[pos + 8:pos + RECORD_FRAME_BYTES])
                why = record_header_problem(rec, 1 << 62)  # the fields; the extent below
                if why is None and rec.end > size:
                    lose_tail("record %d (%s layer %d)" % (rec.seq, rec.kind, rec.layer))
                    break
                if why is None and u32(d, rec.payload_offset) != ZSTD_FRAME_MAGIC:
                    why = "no zstd frame magic at the payload"
                if why is None:
                    records.append(rec)
                    pos = rec.end
                    continue
            else:
                why = "no Record_Header_Frame (magic 0x%08x, size %d)" % (magic, fsize)
            # A damaged header: search forward for the next (0x184D2A5B, 88) pair.
            nxt = d.find(pair, pos + 1)
            self.scan_notes.append("damaged unit at %d (%s); %s" % (
                pos, why, "resumed at %d" % nxt if nxt >= 0 else "no record header after it"))
            if nxt < 0:
                self.scan_stop = "damaged"
                break
            pos = nxt
        return records

    # --- Reading, step 4: one record ------------------------------------------------------
    def read_record(self, rec):
        """Header and payload, checked, decompressed and unfiltered: [heads, tokens, dim]."""
        raw = self.read_payload(rec)
        if rec.filter not in (FILTER_NONE, FILTER_BYTE_PLANES):
            raise FormatError("record %d: unknown Filter %d" % (rec.seq, rec.filter))
        return unfilter(raw, rec)

    def read_payload(self, rec):
        """The record's payload, checked and decompressed, still in its stored (filtered)
        byte order: FORMAT.md Reading, step 4, up to "undo the filter"."""
        d = self.data
        frame = d[rec.offset:rec.offset + RECORD_FRAME_BYTES]
        if len(frame) < RECORD_FRAME_BYTES or u32(frame, 0) != RECORD_FRAME_MAGIC or \
                u32(frame, 4) != RECORD_USER_BYTES:
            raise FormatError("record %d: no Record_Header_Frame at %d" % (rec.seq, rec.offset))
        if frame[8:] != rec.user:
            raise FormatError("record %d: header on disk differs from the index copy" % rec.seq)
        payload = d[rec.payload_offset:rec.end]
        if crc32(payload) != rec.payload_crc:
            raise ChecksumError("record %d (%s layer %d): Payload_Crc mismatch" % (
                rec.seq, rec.kind, rec.layer))
        content_size, has_checksum, frame_len = zstd_frame_info(payload)
        if frame_len != rec.comp_bytes:
            raise FormatError("record %d: the zstd frame is %d bytes, Comp_Bytes %d" % (
                rec.seq, frame_len, rec.comp_bytes))
        if content_size != rec.raw_bytes or not has_checksum:
            raise FormatError("record %d: zstd frame without content size %d or checksum" %
                              (rec.seq, rec.raw_bytes))
        raw = zstd_decompress(payload)
        if len(raw) != rec.raw_bytes:
            raise FormatError("record %d: %d bytes decompressed, Raw_Bytes %d" % (
                rec.seq, len(raw), rec.raw_bytes))
        return raw

    # --- Tensors ---------------------------------------------------------------------------
    def records_of(self, kind, layer):
        return [r for r in self.records if r.kind == kind and r.layer == layer]

    def keys(self):
        """(kind, layer) of every tensor and table (meta_json excluded), in file order."""
        seen = []
        for r in self.records:
            if r.kind_code in KINDS and r.kind != "meta_json" and (r.kind, r.layer) not in seen:
                seen.append((r.kind, r.layer))
        return seen

    def tensor(self, kind, layer=-1):
        """The (layer, kind) tensor assembled from its records (FORMAT.md Record_Header_Frame:
        records share Dtype and Dim, never overlap and cover [0, max Head_End) x
        [0, max Tok_End)). Stored dtype: f16 float16, bf16 uint16 bits, f32, i32, u8."""
        recs = self.records_of(kind, layer)
        if not recs:
            raise KeyError("no %s records for layer %d" % (kind, layer))
        dtypes, dims = {r.dtype_code for r in recs}, {r.dim for r in recs}
        if len(dtypes) != 1 or len(dims) != 1:
            raise FormatError("%s layer %d: records differ in Dtype or Dim" % (kind, layer))
        heads = max(r.head_end for r in recs)
        toks = max(r.tok_end for r in recs)
        out = np.zeros((heads, toks, recs[0].dim), dtype=DTYPES[recs[0].dtype_code][2])
        covered = np.zeros((heads, toks), dtype=np.int32)
        for r in recs:
            out[r.head_begin:r.head_end, r.tok_begin:r.tok_end] = self.read_record(r)
            covered[r.head_begin:r.head_end, r.tok_begin:r.tok_end] += 1
        if (covered > 1).any():
            raise FormatError("%s layer %d: records overlap" % (kind, layer))
        if (covered == 0).any():
            raise FormatError("%s layer %d: records leave a hole" % (kind, layer))
        return out

    def tables(self):
        """Token tables (FORMAT.md Kinds 16..20): token_ids, modality, decode_token_ids as
        [n]; positions as [P, T]; token_text as a list of str (NUL-terminated UTF-8)."""
        out = {}
        for name in ("token_ids", "modality", "positions", "decode_token_ids", "token_text"):
            if not self.records_of(name, -1):
                continue
            t = self.tensor(name, -1)[:, :, 0]      # [rows, n]
            if name == "positions":
                out[name] = t
            elif name == "token_text":
                blob = t[0].tobytes()
                if blob and not blob.endswith(b"\0"):
                    raise FormatError("token_text does not end with a NUL byte")
                out[name] = [s.decode("utf-8") for s in blob.split(b"\0")[:-1]]
            else:
                out[name] = t[0]
        return out

    def meta(self):
        """The meta_json objects, in file order. Each meta_json record holds one JSON object
        ([1, n, 1] u8), except that a writer splits a long one along tokens like any other
        record: a record with Tok_Begin 0 starts an object, a record whose Tok_Begin is the
        previous record's Tok_End continues it. (FORMAT.md does not say this; see the report
        in test_format_spec.py.)"""
        texts = []  # [bytearray, tok_end]
        for r in self.records:
            if r.kind != "meta_json":
                continue
            part = self.read_record(r)[:, :, 0].tobytes()
            if r.tok_begin == 0:
                texts.append([bytearray(part), r.tok_end])
            elif texts and texts[-1][1] == r.tok_begin:
                texts[-1][0] += part
                texts[-1][1] = r.tok_end
            else:
                raise FormatError("meta_json record %d continues no object" % r.seq)
        out = []
        for text, _ in texts:
            obj = json.loads(bytes(text).decode("utf-8"))
            if not isinstance(obj, dict):
                raise FormatError("a meta_json record is not a JSON object")
            out.append(obj)
        return out

    def decode_steps(self):
        """FORMAT.md JSON header, `n_decode`: (planned, captured). Captured is the meta_json's
        capture_stats.n_decode when a record has it, else the fewest Q_decode tokens of any
        layer 0..n_layers-1 (a layer without Q_decode counts 0)."""
        planned = self.header.get("n_decode")
        for m in self.meta():
            stats = m.get("capture_stats")
            if isinstance(stats, dict) and isinstance(stats.get("n_decode"), int):
                return planned, stats["n_decode"]
        n_layers = self.header.get("model", {}).get("n_layers") or 0
        counts = [max([r.tok_end for r in self.records_of("Q_decode", layer)] or [0])
                  for layer in range(n_layers)]
        return planned, min(counts) if counts else 0

    # --- Checks, as `kvtrace verify` would want them ---------------------------------------
    def verify(self):
        """Every record's checksums and payload, record numbers, and the layers the header
        promises (FORMAT.md "JSON header": K and V with n_kv_heads heads and n_tokens tokens,
        Q_window with n_q_heads heads, in every layer 0..n_layers-1).

        Returns {"ok", "complete", "n_records", "damaged": [seq], "tail_bytes_lost",
        "problems": [str]}."""
        problems, damaged = [], []
        if not self.complete:
            problems.append("no valid index/trailer (%s): recovered by scanning" %
                            self.open_problem)
            problems.extend(self.scan_notes)
        for r in self.records:
            try:
                self.read_record(r)
            except FormatError as e:
                damaged.append(r.seq)
                problems.append(str(e))
        seqs = [r.seq for r in self.records]
        if seqs != list(range(len(seqs))):
            problems.append("record numbers are not 0..%d in file order" % (len(seqs) - 1))
        model = self.header.get("model", {})
        n_layers = model.get("n_layers")
        if isinstance(n_layers, int):
            for layer in range(n_layers):
                for kind, heads, toks in (("K", model.get("n_kv_heads"),
                                           self.header.get("n_tokens")),
                                          ("V", model.get("n_kv_heads"),
                                           self.header.get("n_tokens")),
                                          ("Q_window", model.get("n_q_heads"), None)):
                    recs = self.records_of(kind, layer)
                    if not recs:
                        problems.append("layer %d has no %s" % (layer, kind))
                        continue
                    h = max(r.head_end for r in recs)
                    t = max(r.tok_end for r in recs)
                    if h != heads or (toks is not None and t != toks):
                        problems.append("layer %d %s is [%d, %d], header says [%s, %s]" % (
                            layer, kind, h, t, heads, toks if toks is not None else "W"))
        return {"ok": not problems, "complete": self.complete, "n_records": len(self.records),
                "damaged": damaged, "tail_bytes_lost": self.tail_bytes_lost,
                "problems": problems}


def open(path):  # noqa: A001 - mirrors kvtrace.open
    return Trace(path)


if __name__ == "__main__":  # a tiny `info`: python3 format_reader.py TRACE
    import sys
    with Trace(sys.argv[1]) as tr:
        print("%s: version %d.%d, %s, %d records" % (
            tr.path, tr.version[0], tr.version[1],
            "complete (index)" if tr.complete else "recovered by scan", len(tr.records)))
        for note in tr.scan_notes:
            print("  scan: " + note)
        for rec in tr.records:
            print("  %r" % rec)
        v = tr.verify()
        print("verify: %s" % ("OK" if v["ok"] else "; ".join(v["problems"])))
