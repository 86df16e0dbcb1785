#!/usr/bin/python3
"""Hostile but well-formed input gets a clear INVALID_ARGUMENT naming the field (or a one-line
start-up error), never a silent cut, a changed meaning or an effect on other callers:

- string fields that are not UTF-8 or hold a NUL (agent ids, prompts, namespaces, stop strings,
  model names, queries), and enum values the proto does not define;
- requests the prompt cache could answer are validated first, as the engine would;
- RAG embeddings that are not finite or have no direction (all zero); subnormal ones work;
- token files with long, malformed or repeated lines;
- `kvserve tokenize --json` with U+0000 and with bytes that are not UTF-8.

    /usr/bin/python3 tests/rpc/test_input_validation.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto

Regressions of issue 12's findings 3, 4, 5, 6 and 8. Harness: tests/rpc/harness.py.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import unittest

import grpc

import harness
from harness import *  # noqa: F401,F403

G, A, C = "/kvserve.v1.Generation/", "/kvserve.v1.Agents/", "/kvserve.v1.Cache/"


def field(num, wire, payload):
    """One protobuf field, encoded by hand (so that any bytes can be sent)."""
    def varint(v):
        out = bytearray()
        while True:
            b = v & 0x7f
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)
    if wire == 0:
        return varint(num << 3) + varint(payload)
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def fnum(msg, name):
    return msg.DESCRIPTOR.fields_by_name[name].number


class Server1(RedisServerCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.c = cls.srv.client()
        cls.ch = cls.srv.channel()

    def raw(self, path, data):
        """Send raw bytes to a unary method: (code, details)."""
        call = self.ch.unary_unary(path)
        try:
            call(data, timeout=BOUND)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    def assert_refused(self, path, data, name):
        code, details = self.raw(path, data)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{path} {data!r}: {details}")
        self.assertTrue(details.startswith(name + ":"), f"the message should start with {name!r}: {details!r}")
        return details

    def test_string_fields_must_be_utf8_without_nul(self):
        gen = pb.GenerateRequest
        mt = field(fnum(gen, "max_tokens"), 0, 2)
        for bad, why in ((b"a\xff\xfeb", "UTF-8"), (b"a\x00b", "NUL"), (b"\xed\xa0\x80", "UTF-8"),  # a surrogate
                         (b"\xc0\xaf", "UTF-8")):                                                     # overlong
            for fname in ("prompt", "agent_id", "namespace", "stop"):
                msg = field(fnum(gen, fname), 2, bad) + mt + (field(fnum(gen, "prompt"), 2, b"hi")
                                                              if fname != "prompt" else b"")
                for method in ("Submit", "Stream"):
                    if method == "Stream":
                        call = self.ch.unary_stream(G + "Stream")
                        with self.assertRaises(grpc.RpcError) as cm:
                            list(call(msg, timeout=BOUND))
                        code, details = cm.exception.code(), cm.exception.details()
                        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
                        self.assertTrue(details.startswith(fname + ":"), details)
                    else:
                        details = self.assert_refused(G + method, msg, fname)
                    self.assertIn(why, details)
            self.assert_refused(A + "GetAgent", field(fnum(pb.AgentRequest, "agent_id"), 2, bad), "agent_id")
            self.assert_refused(A + "ImportAgent", field(fnum(pb.ImportAgentRequest, "agent_id"), 2, bad), "agent_id")
            rag = field(fnum(pb.RagLookupRequest, "embedding_model"), 2, bad)
            self.assert_refused(C + "RagLookup", rag, "embedding_model")
            self.assert_refused(C + "RagStore", field(fnum(pb.RagStoreRequest, "query"), 2, bad), "query")
            self.assert_refused(C + "Invalidate", field(fnum(pb.InvalidateRequest, "namespace"), 2, bad), "namespace")
        # nested: a field of a sub-message is named with its path
        pol = field(fnum(pb.CachePolicy, "mode"), 0, 7)
        d = self.assert_refused(G + "Submit", field(fnum(gen, "prompt"), 2, b"hi") + mt +
                                field(fnum(gen, "cache"), 2, pol), "cache.mode")
        self.assertIn("7 is not one of its values", d)
        # nothing was created by any of it
        self.assertEqual(list(self.c.list_agents()), [])
        # and good strings (any Unicode) still work
        _, comps = self.c.run_stream(greq(prompt="héllo ✓ 😀", max_tokens=2, agent_id="ünï-cødé ✓",
                                          namespace="ns ✓", stop=["✓"]))
        self.assertEqual(len(comps), 1)
        self.assertEqual([a.agent_id for a in self.c.list_agents()], ["ünï-cødé ✓"])
        self.c.drop_agent("ünï-cødé ✓")

    def test_a_request_the_cache_could_answer_is_validated_first(self):
        ok = greq(prompt="validated before the cache", max_tokens=3, ignore_eos=True)
        self.c.run_stream(ok)
        wait_for(lambda: self.c.run_stream(ok)[1][0].cached, "the completion cached")
        bad = greq(prompt="validated before the cache", max_tokens=3, ignore_eos=True, reset=True)
        for name, call in (("Submit", lambda: self.c.submit(bad)), ("Stream", lambda: list(self.c.stream(bad)))):
            code, details = code_of(call)
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{name} (a cache hit otherwise): {details}")
            self.assertIn("agent_id", details)
        for bad_sampling, name in ((dict(top_p=2), "top_p"), (dict(temperature=-1), "temperature")):
            req = greq(prompt="validated before the cache", max_tokens=3, ignore_eos=True, sampling=bad_sampling)
            code, details = code_of(lambda: self.c.submit(req))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertIn(name, details)

    def test_rag_embeddings_must_be_finite_with_a_direction(self):
        store = unary(self.ch, C + "RagStore", pb.RagStoreRequest, pb.RagStoreReply)
        look = unary(self.ch, C + "RagLookup", pb.RagLookupRequest, pb.RagLookupReply)
        common = dict(namespace="nan", embedding_model="m", top_k=3)
        good = [0.6, 0.8, 0.0, 0.0]
        self.assertTrue(store(pb.RagStoreRequest(query="good", embedding=good, result=b"good", **common),
                              timeout=BOUND).stored)
        nan, inf = float("nan"), float("inf")
        for emb, why in (([0.6, nan, 0, 0], "value 1 is not finite"), ([inf, 0, 0, 0], "value 0 is not finite"),
                         ([0, 0, -inf, 0], "value 2 is not finite"), ([0.0] * 4, "all values are zero (it has no direction)")):
            for name, call in (("RagStore", lambda: store(pb.RagStoreRequest(query="bad", embedding=emb, result=b"x",
                                                                             **common), timeout=BOUND)),
                               ("RagLookup", lambda: look(pb.RagLookupRequest(query="bad", embedding=emb, **common),
                                                          timeout=BOUND))):
                code, details = code_of(call)
                self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{name} {emb}: {details}")
                self.assertEqual(details, "embedding: " + why, name)
        # a good vector still finds its entry with a real similarity
        r = look(pb.RagLookupRequest(query="other words", embedding=[0.6, 0.8, 0.01, 0.0], **common), timeout=BOUND)
        self.assertTrue(r.hit)
        self.assertFalse(r.exact)
        self.assertEqual(r.result, b"good")
        self.assertGreater(r.similarity, 0.99)
        self.assertLessEqual(r.similarity, 1.0)
        # subnormal values: the norm is taken in double, so the direction survives
        tiny = struct.unpack("<f", struct.pack("<I", 1))[0]  # the smallest subnormal float
        self.assertGreater(tiny, 0)
        sub = dict(namespace="subnormal", embedding_model="m", top_k=3)
        self.assertTrue(store(pb.RagStoreRequest(query="s", embedding=[tiny, tiny, 0, 0], result=b"sub", **sub),
                              timeout=BOUND).stored)
        r = look(pb.RagLookupRequest(query="s2", embedding=[1.0, 1.0, 0, 0], **sub), timeout=BOUND)
        self.assertTrue(r.hit, "a subnormal vector lost its direction")
        self.assertAlmostEqual(r.similarity, 1.0, places=5)
        r = look(pb.RagLookupRequest(query="s3", embedding=[1.0, -1.0, 0, 0], **sub), timeout=BOUND)
        self.assertFalse(r.hit)


class TokenFile(unittest.TestCase):
    def start_fails(self, text, expect, line):
        path = os.path.join(TMP, f"tokens-{abs(hash(text))}")
        with open(path, "wb") as f:
            f.write(text)
        rc, err, _ = run_failing(["--token-file", path])
        self.assertEqual(rc, 2, err)
        ours = [l for l in error_lines(err) if l.startswith("kvserve: ")]
        self.assertEqual(len(ours), 1, err)
        self.assertIn(f"{path}:{line}:", ours[0])
        self.assertIn(expect, ours[0])

    def test_bad_lines_refuse_start_with_their_number(self):
        ok = b"# tenants\ntok-a alice\n\n"
        self.start_fails(ok + b"t" * 5000 + b" bob\n", "longer than 4096 bytes", 4)
        self.start_fails(ok + b"tok-b " + b"b" * 300 + b"\n", "tenant is longer than 255 bytes", 4)
        self.start_fails(ok + b"tok-b bob extra\n", 'expected "TOKEN TENANT"', 4)
        self.start_fails(ok + b"only-a-token\n", 'expected "TOKEN TENANT"', 4)
        self.start_fails(ok + b"tok-a mallory\n", "the token of line 2 again", 4)
        self.start_fails(ok + b"tok-b b\xffb\n", "not valid UTF-8", 4)
        self.start_fails(ok + b"tok-b b\x00b\n", "NUL", 4)

    def test_long_tokens_and_tenants_are_kept_whole(self):
        # 600-byte tokens and 250-byte tenants that differ only at their ends
        t1, t2 = "x" * 599 + "1", "x" * 599 + "2"
        n1, n2 = "t" * 249 + "1", "t" * 249 + "2"
        path = os.path.join(TMP, "tokens-long")
        with open(path, "w") as f:
            f.write(f"{t1} {n1}\n{t2} {n2}\n")
        srv = Server("--token-file", path, "--threads", "1").start()
        try:
            a, b = srv.client(t1), srv.client(t2)
            a.run_stream(greq(prompt="hi", max_tokens=2, agent_id="mine"))
            self.assertEqual([x.agent_id for x in a.list_agents()], ["mine"])
            self.assertEqual(list(b.list_agents()), [], "two tenants that differ after byte 255 became one")
            code, _ = code_of(lambda: srv.client(t1[:511]).stats())
            self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED, "the first 511 bytes of a token are not the token")
            srv.stop()
        finally:
            srv.kill()


class ModelFiles(unittest.TestCase):
    def test_weights_that_are_not_finite_are_named_at_load(self):
        d = os.path.join(TMP, "nan-model")
        shutil.copytree(ARGS.model, d)
        path = os.path.join(d, "model.safetensors")
        with open(path, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            name = next(k for k in header if k.endswith("mlp.down_proj.weight"))
            t = header[name]
            self.assertEqual(t["dtype"], "F32")
            b, e = t["data_offsets"]
            f.seek(8 + n + b)
            f.write(struct.pack("<f", float("nan")) * ((e - b) // 4))
        srv = Server("--threads", "1", model=d).start()  # it loads and serves: a warning, not a refusal
        try:
            warn = [l for l in srv.log().splitlines() if " warn " in l and "not finite" in l]
            self.assertEqual(len(warn), 1, srv.log())
            self.assertIn(f'tensor "{name}"', warn[0])
            _, comps = srv.client().run_stream(greq(prompt="hi", max_tokens=2, ignore_eos=True))
            self.assertEqual(len(comps), 1)
            srv.stop()
        finally:
            srv.kill()
        p = subprocess.run([ARGS.kvserve, "generate", "--model", d, "-n", "1", "hi"], capture_output=True,
                           text=True, timeout=BOUND)
        self.assertIn("kvserve: warning: ", p.stderr)
        self.assertIn("not finite", p.stderr)


class TokenizeJson(unittest.TestCase):
    def tokenize(self, payload, *flags):
        return subprocess.run([ARGS.kvserve, "tokenize", "--tokenizer", ARGS.model, "--json", *flags],
                              input=payload, capture_output=True, timeout=BOUND)

    def test_decode_writes_json_whatever_the_bytes(self):
        vocab = json.load(open(os.path.join(ARGS.model, "tokenizer.json")))["model"]["vocab"]
        # byte-level BPE: "Ā" is byte 0x00, "Ã" is 0xC3 (a lead byte with nothing after it), "¿" is 0xBF
        ids = [[vocab["Ā"]], [vocab["Ã"]], [vocab["a"], vocab["¿"], vocab["b"]], [vocab["Ã"], vocab["©"]]]
        p = self.tokenize(json.dumps(ids).encode(), "--decode")
        self.assertEqual(p.returncode, 0, p.stderr)
        out = json.loads(p.stdout.decode("utf-8"))  # strict: the output is JSON, and UTF-8
        self.assertEqual(out, ["\u0000", "\ufffd", "a\ufffdb", "é"])

    def test_encode_refuses_what_it_cannot_pass_on(self):
        p = self.tokenize(b'["a\\u0000b", "x"]')
        self.assertEqual(p.returncode, 1)
        self.assertIn(b"U+0000", p.stderr)
        self.assertEqual(p.stdout, b"")
        p = self.tokenize(b'["a\\\\u0000b"]')  # an escaped backslash, then "u0000": fine
        self.assertEqual(p.returncode, 0, p.stderr)


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-input-validation"))
