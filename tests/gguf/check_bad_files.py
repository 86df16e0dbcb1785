#!/usr/bin/python3
"""Bad GGUF files get a clear error naming what is wrong, never a crash or a hang.

    /usr/bin/python3 tests/gguf/check_bad_files.py --kvserve BUILD/kvserve --gguf MODELS/gguf/tiny.gguf

Each case damages a copy of a good file (tests/gen_gguf.sh writes it) at a place found by
walking its layout: truncated at many points, counts and lengths past the end or absurd,
unknown and unread tensor types, offsets past the end or off the alignment, a shape that
disagrees with the metadata, a zero or a seventh dimension, a name twice, overlapping tensors,
a missing tensor or key, other versions. `kvserve logits` must exit 1 (not 0, not a signal)
and print the expected words; under the sanitizer build the same run checks for memory errors.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Layout:
    """Offsets of the fields of a GGUF file (as our writer lays it out)."""

    def __init__(self, b):
        self.b = b
        self.n_t, self.n_kv = struct.unpack_from("<QQ", b, 8)
        p = 24
        self.kv = {}  # key -> (offset of the entry, offset of the value)
        for _ in range(self.n_kv):
            start = p
            n = struct.unpack_from("<Q", b, p)[0]
            key = b[p + 8:p + 8 + n].decode()
            p += 8 + n
            t = struct.unpack_from("<I", b, p)[0]
            p += 4
            self.kv[key] = (start, p)
            p = self.skip(p, t)
        self.kv_end = p
        self.t = {}  # name -> dict(start, ndims_at, dims_at, type_at, off_at, ne)
        for _ in range(self.n_t):
            start = p
            n = struct.unpack_from("<Q", b, p)[0]
            name = b[p + 8:p + 8 + n].decode()
            p += 8 + n
            nd = struct.unpack_from("<I", b, p)[0]
            ne = list(struct.unpack_from("<%dQ" % nd, b, p + 4))
            info = dict(start=start, ndims_at=p, dims_at=p + 4, type_at=p + 4 + 8 * nd, off_at=p + 8 + 8 * nd, ne=ne)
            info["type"] = struct.unpack_from("<I", b, info["type_at"])[0]
            info["off"] = struct.unpack_from("<Q", b, info["off_at"])[0]
            self.t[name] = info
            p += 4 + 8 * nd + 4 + 8
        self.infos_end = p
        self.data = (p + 31) // 32 * 32

    def skip(self, p, t):
        if t == 8:
            return p + 8 + struct.unpack_from("<Q", self.b, p)[0]
        if t == 9:
            et, n = struct.unpack_from("<IQ", self.b, p)
            p += 12
            for _ in range(n):
                p = self.skip(p, et)
            return p
        return p + SIZES[t]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--gguf", required=True, help="a good F32 llama GGUF file (tiny.gguf)")
    a = ap.parse_args()
    good = open(a.gguf, "rb").read()
    L = Layout(good)
    tmp = tempfile.mkdtemp(prefix="kvbadgguf-")
    passed = failed = 0

    def case(name, data, *want):
        nonlocal passed, failed
        path = os.path.join(tmp, "bad.gguf")
        with open(path, "wb") as f:
            f.write(data)
        try:
            p = subprocess.run([a.kvserve, "logits", "--model", path, "--ids", "1 2", "--out", os.devnull],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            err = p.stderr.decode(errors="replace")
            ok = p.returncode == 1 and all(w in err for w in want) and "AddressSanitizer" not in err \
                and "runtime error" not in err
            msg = "exit %d: %s" % (p.returncode, err.strip().splitlines()[-1] if err.strip() else "(no message)")
        except subprocess.TimeoutExpired:
            ok, msg = False, "timed out (a hang)"
        passed += ok
        failed += not ok
        print("%s %s: %s%s" % ("PASS" if ok else "FAIL", name, msg, "" if ok else "  [wanted: %s]" % " / ".join(want)),
              flush=True)

    def put(data, at, fmt, *v):
        b = bytearray(data)
        struct.pack_into(fmt, b, at, *v)
        return bytes(b)

    # truncated anywhere: the header, the metadata, the tensor descriptions, the data
    cuts = sorted({0, 3, 4, 7, 8, 16, 23, 24, 30, L.kv_end - 1, L.kv_end, L.kv_end + 5, L.infos_end - 3,
                   L.infos_end, L.data, L.data + 100, len(good) // 2, len(good) - 1}
                  | {24 + (L.kv_end - 24) * k // 13 for k in range(1, 13)})
    for c in cuts:
        case("truncated at %d of %d" % (c, len(good)), good[:c], "kvserve:")
    case("no magic", b"GGUX" + good[4:], "nor a GGUF file")
    case("version 1", put(good, 4, "<I", 1), "GGUF version 1")
    case("version 4", put(good, 4, "<I", 4), "GGUF version 4")
    case("big-endian", put(good, 4, ">I", 3), "big-endian")
    case("absurd tensor count", put(good, 8, "<Q", 1 << 40), "more than the file can hold")
    case("absurd metadata count", put(good, 16, "<Q", 1 << 60), "more than the file can hold")
    first_kv = min(v[0] for v in L.kv.values())
    case("a key length past the end", put(good, first_kv, "<Q", 1 << 62), "metadata entry 0")
    tok_at = L.kv["tokenizer.ggml.tokens"][1]
    case("an array length past the end", put(good, tok_at + 4, "<Q", 1 << 60), "tokenizer.ggml.tokens", "past the end")
    case("an unknown value type", put(good, L.kv["general.name"][1] - 4, "<I", 77), "general.name", "unknown value type")
    case("alignment not a power of two", put(good, L.kv["general.alignment"][1], "<I", 48), "general.alignment")
    t = L.t["blk.0.ffn_down.weight"]
    case("an unknown tensor type", put(good, t["type_at"], "<I", 99), "blk.0.ffn_down.weight", "unknown type 99")
    case("a type kvserve does not read", put(good, t["type_at"], "<I", 13), "blk.0.ffn_down.weight", "Q5_K")
    case("an offset past the end", put(good, t["off_at"], "<Q", len(good)), "blk.0.ffn_down.weight", "past the end")
    case("an offset off the alignment", put(good, t["off_at"], "<Q", t["off"] + 4), "blk.0.ffn_down.weight",
         "alignment")
    case("a zero dimension", put(good, t["dims_at"], "<Q", 0), "blk.0.ffn_down.weight", "dimension 0")
    case("seven dimensions", put(good, t["ndims_at"], "<I", 7), "blk.0.ffn_down.weight", "7 dimensions")
    case("an absurd dimension", put(good, t["dims_at"] + 8, "<Q", 1 << 50), "blk.0.ffn_down.weight", "dimension 1")
    ne0, ne1 = t["ne"]
    case("a transposed shape", put(good, t["dims_at"], "<QQ", ne1, ne0), "blk.0.ffn_down.weight", "expected")
    up = L.t["blk.0.ffn_up.weight"]
    case("a tensor grown over the next", put(good, up["dims_at"] + 8, "<Q", up["ne"][1] * 2), "overlap")
    k, v = L.t["blk.0.attn_k.weight"], L.t["blk.0.attn_v.weight"]
    b = bytearray(good)
    b[k["start"] + 8:k["start"] + 8 + len("blk.0.attn_v.weight")] = b"blk.0.attn_v.weight"
    case("a name twice", bytes(b), "blk.0.attn_v.weight", "twice")
    same = {}
    for key in L.kv:
        same.setdefault(len(key), []).append(key)
    k1, k2 = next(v[:2] for v in same.values() if len(v) > 1)
    b = bytearray(good)
    at = L.kv[k2][0] + 8
    b[at:at + len(k1)] = k1.encode()
    case("a metadata key twice", bytes(b), k1, "appears twice")
    b = bytearray(good)
    at = L.t["blk.1.ffn_up.weight"]["start"] + 8
    b[at:at + 19] = b"blk.1.ffn_UP.weight"
    case("a missing tensor", bytes(b), "blk.1.ffn_up.weight", "missing")
    b = bytearray(good)
    at = L.kv["llama.block_count"][0] + 8
    b[at:at + 17] = b"llama.block_COUNT"
    case("a missing key", bytes(b), "llama.block_count is missing")
    b = bytearray(good)
    at = L.kv["general.architecture"][1] + 8
    b[at:at + 5] = b"gpt2x"
    case("an unknown architecture", bytes(b), "gpt2x", "not supported")
    print("bad GGUF files: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
