#!/usr/bin/python3
"""Byte-level BPE trainer that writes a Hugging Face `tokenizer.json`.

The output has the same shape as SmolLM2's tokenizer.json:
  * pre-tokenizer: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]
  * model: BPE over the GPT-2 byte->unicode alphabet, merges as "a b" strings
  * added tokens: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (special)
  * ids: specials 0..2, then the 256 byte characters (sorted by code point,
    as the Hugging Face trainer and GPT-2 order them), then merge results in
    rank order.

Training follows the Hugging Face `BpeTrainer` semantics:
  * the corpus is pre-tokenized exactly as the tokenizer would (digits
    isolated one by one, then the GPT-2 split regex, then bytes -> chars);
  * the most frequent pair is merged; ties go to the smallest (left id,
    right id) pair;
  * the merged string may already be in the vocabulary (e.g. "ab"+"c" after
    "a"+"bc"); then the existing id is reused, the merge is still recorded,
    and training continues until the vocabulary has exactly `vocab_size`
    entries (so len(merges) may be slightly larger than vocab_size - 259).

Pair counts are maintained incrementally (pair -> words index, max-heap with
lazy invalidation), so a 49152-entry vocabulary trains in about a minute.

Usage as a tool:
  bpe_train.py train --vocab-size 1024 --out tokenizer.json [--cache DIR]
  bpe_train.py encode --tokenizer tokenizer.json --text "..."   (reference encoder)
  bpe_train.py check  --tokenizer tokenizer.json                (consistency checks)
"""

import argparse
import glob
import hashlib
import heapq
import json
import os
import sys
import time
from collections import Counter, defaultdict

import regex

ALGO_VERSION = "kvserve-bpe-1"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# GPT-2 split pattern, exactly the one Hugging Face's ByteLevel pre-tokenizer uses.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_RE = regex.compile(GPT2_PATTERN)
# Digits(individual_digits=True): every char::is_numeric char (= \p{N}) is isolated.
DIGIT_SPLIT_RE = regex.compile(r"(\p{N})")

DEFAULT_CORPUS_BUDGET = 16 * 1024 * 1024


def bytes_to_unicode():
    """GPT-2 byte -> printable unicode char map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}
# Translation table: latin-1 decoded bytes -> byte-level chars.
_BYTE_TRANS = {i: BYTE_ENCODER[i] for i in range(256)}


def to_byte_level(piece):
    return piece.encode("utf-8").decode("latin-1").translate(_BYTE_TRANS)


def pre_tokenize(text):
    """Split `text` exactly as the HF Sequence[Digits(individual), ByteLevel] pre-tokenizer.

    Returns the list of byte-level-mapped pieces (strings over the 256-char alphabet).
    """
    out = []
    for part in DIGIT_SPLIT_RE.split(text):
        if not part:
            continue
        for m in GPT2_RE.findall(part):
            out.append(to_byte_level(m))
    return out


# ----------------------------------------------------------------------------- corpus

def default_corpus_files():
    """Text present on a Debian 12 machine: license texts and the Python stdlib sources.

    Sorted, symlinks skipped (GPL -> GPL-3 etc. would only duplicate text)."""
    files = []
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if not os.path.islink(f) and os.path.isfile(f):
            files.append(f)
    # Only what libpython3.11-minimal / libpython3.11-stdlib ship (every Debian 12 with
    # python3): skip separately packaged or optional trees.
    skip_dirs = {"dist-packages", "site-packages", "test", "tests", "idle_test", "distutils",
                 "lib2to3", "idlelib", "tkinter", "turtledemo", "venv", "ensurepip"}
    root = "/usr/lib/python3.11"
    py = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith("config-")]
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if fn.endswith(".py") and not os.path.islink(p) and os.path.isfile(p):
                py.append(p)
    files.extend(sorted(py))
    return files


def load_corpus(files=None, budget=DEFAULT_CORPUS_BUDGET):
    """Concatenate files in order until `budget` bytes; the last file is cut at the budget
    (on a line boundary). Returns (text, sha256 of the bytes used, n_files)."""
    if files is None:
        files = default_corpus_files()
    chunks = []
    total = 0
    used = 0
    for f in files:
        if total >= budget:
            break
        with open(f, "rb") as fh:
            data = fh.read()
        if total + len(data) > budget:
            cut = data.rfind(b"\n", 0, budget - total)
            data = data[:cut + 1] if cut >= 0 else b""
        chunks.append(data)
        total += len(data)
        used += 1
    raw = b"".join(chunks)
    return raw.decode("utf-8", errors="replace"), hashlib.sha256(raw).hexdigest(), used


def count_words(text):
    counts = Counter()
    for part in DIGIT_SPLIT_RE.split(text):
        if part:
            counts.update(GPT2_RE.findall(part))
    # map to byte-level once per distinct word
    out = Counter()
    for w, c in counts.items():
        out[to_byte_level(w)] += c
    return out


# ----------------------------------------------------------------------------- training

def train_bpe(word_counts, vocab_size, specials=SPECIAL_TOKENS, log=None):
    """Train byte-level BPE. Returns (vocab: list of token strings indexed by id, merges: list of (a, b))."""
    id_to_tok = list(specials)
    alphabet = sorted(BYTE_ENCODER.values(), key=ord)
    id_to_tok.extend(alphabet)
    tok_to_id = {t: i for i, t in enumerate(id_to_tok)}
    if len(tok_to_id) != len(id_to_tok):
        raise ValueError("special token collides with a byte character")
    if vocab_size < len(id_to_tok):
        raise ValueError("vocab_size %d < base vocabulary %d" % (vocab_size, len(id_to_tok)))

    # Deterministic word order: sort by the word string.
    items = sorted(word_counts.items())
    words = [[tok_to_id[ch] for ch in w] for w, _ in items]
    counts = [c for _, c in items]

    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for wi, (w, c) in enumerate(zip(words, counts)):
        for p in zip(w, w[1:]):
            pair_counts[p] += c
            where[p].add(wi)

    heap = [(-c, p[0], p[1]) for p, c in pair_counts.items() if c > 0]
    heapq.heapify(heap)

    merges = []
    merged_pairs = set()
    n_dup = 0
    t0 = time.time()
    while len(id_to_tok) < vocab_size:
        if not heap:
            raise RuntimeError("corpus exhausted: no pairs left at vocab size %d (want %d)"
                               % (len(id_to_tok), vocab_size))
        negc, a, b = heapq.heappop(heap)
        pair = (a, b)
        cur = pair_counts.get(pair, 0)
        if cur != -negc:
            if cur > 0:
                heapq.heappush(heap, (-cur, a, b))
            continue
        if cur <= 0:
            continue
        if pair in merged_pairs:
            # Can only happen after a duplicate-string merge re-created the pair; the
            # encoder applies the first rank anyway, so never record it twice.
            continue
        merged_pairs.add(pair)
        new_str = id_to_tok[a] + id_to_tok[b]
        new_id = tok_to_id.get(new_str)
        if new_id is None:
            new_id = len(id_to_tok)
            id_to_tok.append(new_str)
            tok_to_id[new_str] = new_id
        else:
            n_dup += 1
        merges.append(pair)

        touched = set()
        for wi in sorted(where.pop(pair, ())):
            w = words[wi]
            n = len(w)
            # quick reject (stale index entries)
            i = 0
            found = False
            while i < n - 1:
                if w[i] == a and w[i + 1] == b:
                    found = True
                    break
                i += 1
            if not found:
                continue
            c = counts[wi]
            nw = []
            i = 0
            while i < n:
                if i < n - 1 and w[i] == a and w[i + 1] == b:
                    nw.append(new_id)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            for p in zip(w, w[1:]):
                pair_counts[p] -= c
            for p in zip(nw, nw[1:]):
                pair_counts[p] += c
                if p[0] == new_id or p[1] == new_id:
                    where[p].add(wi)
                    touched.add(p)
            words[wi] = nw
        pair_counts.pop(pair, None)
        for p in sorted(touched):
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
        if log and len(merges) % 5000 == 0:
            log("  %d merges, vocab %d, %.1fs" % (len(merges), len(id_to_tok), time.time() - t0))
    if log:
        log("  done: %d merges (%d reused an existing token), vocab %d, %.1fs"
            % (len(merges), n_dup, len(id_to_tok), time.time() - t0))
    return id_to_tok, [(id_to_tok[a], id_to_tok[b]) for a, b in merges]


# ----------------------------------------------------------------------------- tokenizer.json

def tokenizer_json(id_to_tok, merges, specials=SPECIAL_TOKENS):
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(id_to_tok)},
            "merges": ["%s %s" % m for m in merges],
        },
    }


def dump_tokenizer_json(obj):
    # Same layout as HF's serializer output is not required; keep it compact but
    # deterministic and valid UTF-8 (ensure_ascii=False like HF).
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def build_tokenizer_json_text(vocab_size, cache_dir=None, budget=DEFAULT_CORPUS_BUDGET, log=None):
    """Train (or fetch from cache) and return the tokenizer.json text."""
    t0 = time.time()
    text, digest, nfiles = load_corpus(budget=budget)
    key = hashlib.sha256(("%s|%s|%d|%d" % (ALGO_VERSION, digest, budget, vocab_size)).encode()).hexdigest()[:24]
    if cache_dir:
        path = os.path.join(cache_dir, "tokenizer-%d-%s.json" % (vocab_size, key))
        if os.path.exists(path):
            if log:
                log("tokenizer: cache hit %s" % path)
            with open(path, encoding="utf-8") as f:
                return f.read()
    if log:
        log("tokenizer: corpus %d files, %d chars, sha256 %s..." % (nfiles, len(text), digest[:16]))
    wc = count_words(text)
    if log:
        log("tokenizer: %d distinct words (%.1fs); training vocab %d"
            % (len(wc), time.time() - t0, vocab_size))
    id_to_tok, merges = train_bpe(wc, vocab_size, log=log)
    out = dump_tokenizer_json(tokenizer_json(id_to_tok, merges))
    if log:
        log("tokenizer: trained in %.1fs" % (time.time() - t0))
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.%d" % os.getpid()
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(out)
        os.replace(tmp, path)
    return out


# ----------------------------------------------------------------------------- reference encoder

class Tokenizer:
    """Plain reference encoder/decoder for the tokenizer.json produced above
    (BPE by merge rank, HF semantics: lowest rank first, leftmost among equals)."""

    def __init__(self, path_or_obj):
        if isinstance(path_or_obj, dict):
            obj = path_or_obj
        else:
            with open(path_or_obj, encoding="utf-8") as f:
                obj = json.load(f)
        m = obj["model"]
        self.vocab = m["vocab"]
        self.id_to_tok = {i: t for t, i in self.vocab.items()}
        self.ranks = {}
        for r, s in enumerate(m["merges"]):
            a, b = s.split(" ") if isinstance(s, str) else s
            self.ranks.setdefault((a, b), r)
        self.added = {t["content"]: t["id"] for t in obj.get("added_tokens", [])}
        self.special_ids = {t["id"] for t in obj.get("added_tokens", []) if t.get("special")}
        self._cache = {}
        if self.added:
            self._added_re = regex.compile("(" + "|".join(regex.escape(s) for s in
                                           sorted(self.added, key=len, reverse=True)) + ")")
        else:
            self._added_re = None

    def bpe(self, word):
        r = self._cache.get(word)
        if r is not None:
            return r
        syms = list(word)
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                rk = self.ranks.get((syms[i], syms[i + 1]))
                if rk is not None and (best is None or rk < best[0]):
                    best = (rk, i)
            if best is None:
                break
            a, b = syms[best[1]], syms[best[1] + 1]
            out = []
            i = 0
            while i < len(syms):
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        ids = [self.vocab[s] for s in syms]
        self._cache[word] = ids
        return ids

    def encode(self, text):
        ids = []
        parts = self._added_re.split(text) if self._added_re else [text]
        for part in parts:
            if not part:
                continue
            if part in self.added:
                ids.append(self.added[part])
                continue
            for piece in pre_tokenize(part):
                ids.extend(self.bpe(piece))
        return ids

    def decode(self, ids, skip_special=False):
        bs = bytearray()
        out = []
        for i in ids:
            t = self.id_to_tok[i]
            if i in self.special_ids or t in self.added:
                if skip_special:
                    continue
                out.append(bs.decode("utf-8", errors="replace"))
                bs = bytearray()
                out.append(t)
            else:
                bs.extend(BYTE_DECODER[c] for c in t)
        out.append(bs.decode("utf-8", errors="replace"))
        return "".join(out)


def check_tokenizer(obj, vocab_size=None):
    """Structural consistency checks; returns a list of error strings."""
    errs = []
    m = obj["model"]
    vocab = m["vocab"]
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        errs.append("vocab ids are not 0..n-1")
    if vocab_size is not None and len(vocab) != vocab_size:
        errs.append("vocab size %d != %d" % (len(vocab), vocab_size))
    for i, s in enumerate(SPECIAL_TOKENS):
        if vocab.get(s) != i:
            errs.append("special %s not at id %d" % (s, i))
    alpha = sorted(BYTE_ENCODER.values(), key=ord)
    for k, ch in enumerate(alpha):
        if vocab.get(ch) != 3 + k:
            errs.append("byte char %r not at id %d" % (ch, 3 + k))
            break
    produced = set()
    seen = set()
    max_id = 2 + 256
    for r, s in enumerate(m["merges"]):
        parts = s.split(" ")
        if len(parts) != 2:
            errs.append("merge %d malformed: %r" % (r, s))
            continue
        a, b = parts
        if (a, b) in seen:
            errs.append("duplicate merge %r" % s)
        seen.add((a, b))
        if a not in vocab or b not in vocab:
            errs.append("merge %d %r uses unknown token" % (r, s))
            continue
        nid = vocab.get(a + b)
        if nid is None:
            errs.append("merge %d result %r not in vocab" % (r, a + b))
            continue
        if vocab[a] > max_id or vocab[b] > max_id:
            errs.append("merge %d uses a token created later" % r)
        if nid > max_id + 1:
            errs.append("merge %d creates id %d out of order" % (r, nid))
        max_id = max(max_id, nid)
        produced.add(nid)
    for t, i in vocab.items():
        if i >= 3 + 256 and i not in produced:
            errs.append("token %r (id %d) is produced by no merge" % (t, i))
            break
    return errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--cache")
    t.add_argument("--budget", type=int, default=DEFAULT_CORPUS_BUDGET)
    e = sub.add_parser("encode")
    e.add_argument("--tokenizer", required=True)
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--file")
    c = sub.add_parser("check")
    c.add_argument("--tokenizer", required=True)
    c.add_argument("--vocab-size", type=int)
    args = ap.parse_args(argv)

    log = lambda s: print(s, file=sys.stderr, flush=True)
    if args.cmd == "train":
        text = build_tokenizer_json_text(args.vocab_size, args.cache, args.budget, log=log)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        return 0
    if args.cmd == "encode":
        tok = Tokenizer(args.tokenizer)
        if args.file:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        else:
            text = args.text
        print(" ".join(map(str, tok.encode(text))))
        return 0
    if args.cmd == "check":
        with open(args.tokenizer, encoding="utf-8") as f:
            obj = json.load(f)
        errs = check_tokenizer(obj, args.vocab_size)
        tok = Tokenizer(obj)
        text, _, _ = load_corpus(budget=200000)
        ids = tok.encode(text)
        if tok.decode(ids) != text:
            errs.append("decode(encode(corpus)) round trip failed")
        for e_ in errs:
            print("ERROR:", e_)
        print("tokenizer: vocab %d, merges %d, %d corpus chars -> %d tokens, %s"
              % (len(obj["model"]["vocab"]), len(obj["model"]["merges"]), len(text), len(ids),
                 "OK" if not errs else "%d errors" % len(errs)))
        return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
