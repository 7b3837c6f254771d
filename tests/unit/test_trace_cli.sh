#!/usr/bin/env bash
# test_trace_cli.sh - the info/verify commands (verify --json too) on a good, a truncated and a
# damaged trace, --help and bad-input exits, info's layer counts and decode steps, and `zstd -d`
# decoding a .kvt file (interoperability).
set -u
BIN=${KVT_BIN:?}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0; pass=0
check() { if eval "$2"; then pass=$((pass+1)); else echo "FAILED: $1"; fail=$((fail+1)); fi; }

for c in info verify; do
    check "$c --help exits 0" "$BIN $c --help >/dev/null"
    check "$c without args fails" "! $BIN $c >/dev/null 2>&1"
done
check "unknown command fails with one line" "[ \$($BIN nosuch 2>&1 >/dev/null | wc -l) -eq 1 ]"

# A trace to work on: the bundled real trace captured from stories260K
cp "${KVT_SOURCE_ROOT:?}/traces/samples/stories260K.kvt" "$TMP/t.kvt"
check "verify on a good trace exits 0" "$BIN verify $TMP/t.kvt >/dev/null"
check "info prints the shape" "$BIN info $TMP/t.kvt | grep -q 'L='"
check "info --json is JSON" "$BIN info --json $TMP/t.kvt | grep -q '\"tensors\"'"
# layers are the model's layers holding a kind (5 in stories260K); the tables belong to none
$BIN info $TMP/t.kvt >$TMP/t.info
check "info: K in 5 layers" "grep -Eq '^K +5 +5 ' $TMP/t.info"
check "info: token_ids in no layer" "grep -Eq '^token_ids +- +1 ' $TMP/t.info"
check "info: all 64 decode steps, nothing more said" "grep -q ' G=64  kv dtype' $TMP/t.info"
# a header string that is not UTF-8 (another writer's Latin-1 model name, crc32 redone):
# --json stays UTF-8 text, the byte a '?'
if PY=$(command -v python3); then
    "$PY" - "$TMP/t.kvt" "$TMP/lat.kvt" <<'PYEOF'
import struct, sys, zlib
d = bytearray(open(sys.argv[1], "rb").read())
j = struct.unpack_from("<I", d, 20)[0]
i = d.index(b'"stories260K"', 24, 24 + j)
d[i + 11] = 0xE9  # the K of "stories260K"
struct.pack_into("<I", d, 24 + j, zlib.crc32(bytes(d[8:24 + j])))
open(sys.argv[2], "wb").write(bytes(d))
PYEOF
    check "info --json on a Latin-1 header string is UTF-8 text" \
        "$BIN info --json $TMP/lat.kvt | iconv -f UTF-8 -t UTF-8 >/dev/null 2>&1 &&
         $BIN info --json $TMP/lat.kvt | grep -q '\"name\":[[:space:]]*\"stories260?\"'"
fi
$BIN info --json $TMP/t.kvt | tr -d ' \t\n' >$TMP/t.json
check "info --json: K layers 5, token_ids layers 0" \
    "grep -q '\"K\":{\"records\":5,\"layers\":5,' $TMP/t.json && grep -q '\"token_ids\":{\"records\":1,\"layers\":0,' $TMP/t.json"
check "info --json: 64 of 64 decode steps, from the capture's statistics" \
    "grep -q '\"decode_steps\":{\"planned\":64,\"captured\":64,\"captured_from\":\"capture_stats\",\"stopped_early\":false}' $TMP/t.json"
check "nonexistent trace: one error line" \
    "[ \$($BIN info $TMP/none.kvt 2>&1 >/dev/null | wc -l) -eq 1 ] && ! $BIN info $TMP/none.kvt 2>/dev/null"

size=$(stat -c %s "$TMP/t.kvt")
head -c $((size * 2 / 3)) "$TMP/t.kvt" > "$TMP/cut.kvt"
head -c 300 "$TMP/t.kvt" > "$TMP/hcut.kvt" # inside the JSON header: says so, not "inconsistent"
check "verify on a trace cut inside its header: exit 2, one line saying so" \
    "$BIN verify $TMP/hcut.kvt >/dev/null 2>$TMP/err; [ \$? -eq 2 ] && [ \$(wc -l < $TMP/err) -eq 1 ] && grep -q 'cut short inside its header (300 of its' $TMP/err"
check "verify on a truncated trace exits 1" "$BIN verify $TMP/cut.kvt >$TMP/v.out; [ \$? -eq 1 ]"
check "verify says the trace was not finished" "grep -q 'not finished' $TMP/v.out"
check "verify names missing tensors" "grep -q 'missing' $TMP/v.out"
check "info still works on a truncated trace" "$BIN info $TMP/cut.kvt | grep -q INCOMPLETE"
# the cut lost the decode records and the meta_json: the records say how many steps are left
check "info on a truncated trace: G=0 (64 planned; the records hold fewer)" \
    "$BIN info $TMP/cut.kvt | grep -q ' G=0 (64 planned; the records hold fewer)  kv dtype'"
check "info --json on a truncated trace: 0 of 64 decode steps, from the records" \
    "$BIN info --json $TMP/cut.kvt | tr -d ' \t\n' | grep -q '\"decode_steps\":{\"planned\":64,\"captured\":0,\"captured_from\":\"records\",\"stopped_early\":true}'"
printf 'garbage garbage garbage garbage' > "$TMP/g.kvt"
check "verify on garbage exits 2" "$BIN verify $TMP/g.kvt >/dev/null 2>&1; [ \$? -eq 2 ]"

# verify --json: the same report as one object, the same exit status
check "verify --json on a good trace: exit 0, intact, 40 of 40 records, no problems" \
    "$BIN verify --json $TMP/t.kvt | tr -d ' \t\n' | grep -q '^{\"path\":\"$TMP/t.kvt\",\"intact\":true,\"header_ok\":true,\"index_ok\":true,\"trailer_ok\":true,\"records_ok\":40,\"records_bad\":0,\"records_expected\":40,\"tail_bytes_lost\":0,\"problems\":\[\]}$'"
$BIN verify --json $TMP/cut.kvt >$TMP/cut.json
check "verify --json on a truncated trace: exit 1" "[ \$? -eq 1 ]"
tr -d ' \t\n' <$TMP/cut.json >$TMP/cut1.json
check "verify --json on a truncated trace: not intact, no index, bytes lost, layer 4 missing (no offset)" \
    "grep -q '\"intact\":false,\"header_ok\":true,\"index_ok\":false,\"trailer_ok\":false,' $TMP/cut1.json &&
     grep -q '\"records_expected\":null,\"tail_bytes_lost\":[1-9]' $TMP/cut1.json &&
     grep -q '{\"offset\":null,\"record\":null,\"kind\":\"K\",\"layer\":4,\"what\":\"layer4:K,VandQ_windowmissing\"}' $TMP/cut1.json"
cp "$TMP/t.kvt" "$TMP/flip.kvt" # one byte of layer 3's K payload changed
printf '\252' | dd of="$TMP/flip.kvt" bs=1 seek=$(($(stat -c %s "$TMP/t.kvt") / 2)) conv=notrunc 2>/dev/null
check "verify --json on a damaged record: exit 1, its offset, number, kind and layer" \
    "$BIN verify --json $TMP/flip.kvt >$TMP/flip.json; [ \$? -eq 1 ] && tr -d ' \t\n' <$TMP/flip.json |
     grep -q '\"records_ok\":39,\"records_bad\":1,.*\"problems\":\[{\"offset\":[1-9][0-9]*,\"record\":15,\"kind\":\"K\",\"layer\":3,\"what\":\"record15(layer3K):payloadchecksummismatch\"}\]}$'"
check "verify --json on garbage: exit 2, one line on stderr, nothing on stdout" \
    "$BIN verify --json $TMP/g.kvt >$TMP/g.out 2>$TMP/g.err; [ \$? -eq 2 ] && [ ! -s $TMP/g.out ] && [ \$(wc -l <$TMP/g.err) -eq 1 ]"
check "verify --quiet --json: a usage error" "$BIN verify --quiet --json $TMP/t.kvt >/dev/null 2>&1; [ \$? -eq 2 ]"

if command -v zstd >/dev/null; then
    check "zstd -t accepts a .kvt file" "zstd -q -t $TMP/t.kvt"
    check "zstd -d decodes a .kvt file" "zstd -q -d -c $TMP/t.kvt > $TMP/raw.bin && [ -s $TMP/raw.bin ]"
else
    echo "note: zstd command not installed; interoperability not checked"
fi
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
