#!/usr/bin/python3
"""Two tenants on one server, through the real service (Debian's python3-grpcio):
nothing one tenant does reaches the other, over every RPC and every cache —
the prefix (KV) cache, the prompt cache, the RAG cache, agents, agent
exports/imports and request ids.

    /usr/bin/python3 tests/rpc/test_tenant_isolation.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto

Regressions of issue 12's findings 1 (a forged import poisoned a shared
prefix for everyone) and 2 (cached_tokens told tenant B that tenant A had sent
a prompt). Harness: tests/rpc/harness.py.
"""
import os
import sys
import unittest

import grpc

import harness
from harness import *  # noqa: F401,F403

ALICE, BOB = "tok-alice-5e1", "tok-bob-77c"
BYPASS = None  # set in setUpModule: CachePolicy(mode=BYPASS), so the prompt cache never answers


def setUpModule():
    global BYPASS, TOKENS
    BYPASS = pb.CachePolicy(mode=pb.CachePolicy.BYPASS)
    TOKENS = os.path.join(TMP, "isolation-tokens")
    with open(TOKENS, "w") as f:
        f.write(f"{ALICE} alice\n{BOB} bob\n")


def key_file(name, byte):
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(bytes([byte]) * 32)
    return path


class Isolation(RedisServerCase):
    """One server with two tenants and a Redis, shared by the tests below."""

    @classmethod
    def server_args(cls):
        return ("--token-file", TOKENS)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.a, cls.b = cls.srv.client(ALICE), cls.srv.client(BOB)

    def usage(self, c, req):
        toks, comps = c.run_stream(req)
        self.assertEqual(len(comps), 1)
        self.assertFalse(comps[0].cached)
        return comps[0]

    def test_prefix_kv_is_never_shared_across_tenants(self):
        ids = rand_ids(40, 1201)  # two full blocks of 16, and more
        first = self.usage(self.a, greq(ids=ids, max_tokens=4, ignore_eos=True, cache=BYPASS))
        again = self.usage(self.a, greq(ids=ids, max_tokens=4, ignore_eos=True, cache=BYPASS))
        other = self.usage(self.b, greq(ids=ids, max_tokens=4, ignore_eos=True, cache=BYPASS))
        self.assertEqual(first.usage.cached_tokens, 0)
        self.assertEqual(again.usage.cached_tokens, 32, "a tenant reuses its own prefix")
        self.assertEqual(other.usage.cached_tokens, 0, "bob's usage reveals that alice sent this prompt")
        self.assertEqual(list(other.token_ids), list(first.token_ids))

    def test_an_imported_agent_never_feeds_the_prefix_cache(self):
        # alice's agent of 10 + 1 tokens: its first block is only partly filled
        p, q = rand_ids(10, 1202), rand_ids(20, 1203)
        t1 = self.usage(self.a, greq(ids=p, max_tokens=1, ignore_eos=True, agent_id="imp"))
        data = self.a.export_agent("imp")
        self.a.drop_agent("imp")
        self.a.import_agent("imp", data)
        # the next turn completes the first block (10 imported + 6 new tokens) and the second
        self.usage(self.a, greq(ids=q, max_tokens=2, ignore_eos=True, agent_id="imp"))
        victim = p + list(t1.token_ids) + q[:13]
        for who, c in (("alice", self.a), ("bob", self.b)):
            comp = self.usage(c, greq(ids=victim, max_tokens=4, ignore_eos=True, cache=BYPASS))
            self.assertEqual(comp.usage.cached_tokens, 0, f"{who} reused KV that came from an import")
        self.a.drop_agent("imp")

    def test_agents_exports_and_imports_stay_with_their_tenant(self):
        self.usage(self.a, greq(ids=rand_ids(12, 1204), max_tokens=3, ignore_eos=True, agent_id="mine"))
        for name, call in (("GetAgent", lambda: self.b.get_agent("mine")),
                           ("DropAgent", lambda: self.b.drop_agent("mine")),
                           ("ExportAgent", lambda: self.b.export_agent("mine"))):
            code, details = code_of(call)
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, f"bob {name}: {details}")
        self.assertNotIn("mine", [x.agent_id for x in self.b.list_agents()])
        data = self.a.export_agent("mine")
        tampered = bytearray(data)
        tampered[len(data) - 32 - 8 - 1] ^= 0x01  # the last KV byte (before the engine's checksum and the tag)
        cases = (("bob importing alice's export", self.b, data),
                 ("a flipped KV byte", self.a, bytes(tampered)),
                 ("the signature cut off", self.a, data[:-32]),
                 ("one byte of signature missing", self.a, data[:-1]))
        for what, c, blob in cases:
            code, details = code_of(lambda: c.import_agent("stolen", blob))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {details}")
            self.assertIn("data", details, what)
        for c in (self.a, self.b):
            self.assertNotIn("stolen", [x.agent_id for x in c.list_agents()], "a refused import left an agent")
        self.a.drop_agent("mine")

    def test_request_ids_prompt_and_rag_caches_stay_with_their_tenant(self):
        rid = self.a.submit(greq(ids=rand_ids(6, 1205), max_tokens=3, ignore_eos=True))
        for name, call in (("Step", lambda: self.b.step([rid], wait_ms=0)), ("Cancel", lambda: self.b.cancel(rid))):
            code, details = code_of(call)
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, f"bob {name} of alice's request: {details}")
        # the prompt cache: alice's answer is hers
        req = greq(prompt="isolated prompt cache", max_tokens=4, ignore_eos=True)
        self.a.run_stream(req)
        wait_for(lambda: self.a.run_stream(req)[1][0].cached, "alice's completion cached")
        _, comps = self.b.run_stream(req)
        self.assertFalse(comps[0].cached, "bob got alice's cached completion")
        inv = unary(self.a.ch, "/kvserve.v1.Cache/Invalidate", pb.InvalidateRequest, pb.InvalidateReply)
        inv(pb.InvalidateRequest(namespace="", purge=True), timeout=BOUND, metadata=self.b.md)  # bob's own ""
        self.assertTrue(self.a.run_stream(req)[1][0].cached, "bob's Invalidate dropped alice's entry")
        # the RAG cache
        store = unary(self.a.ch, "/kvserve.v1.Cache/RagStore", pb.RagStoreRequest, pb.RagStoreReply)
        look = unary(self.a.ch, "/kvserve.v1.Cache/RagLookup", pb.RagLookupRequest, pb.RagLookupReply)
        common = dict(namespace="kb", embedding_model="m", top_k=2, embedding=[0.6, 0.8, 0.0])
        self.assertTrue(store(pb.RagStoreRequest(query="q", result=b"alice's docs", **common), timeout=BOUND,
                              metadata=self.a.md).stored)
        self.assertTrue(look(pb.RagLookupRequest(query="q", **common), timeout=BOUND, metadata=self.a.md).hit)
        self.assertFalse(look(pb.RagLookupRequest(query="q", **common), timeout=BOUND, metadata=self.b.md).hit,
                         "bob got alice's RAG entry")
        # collect alice's request (bob's calls did not touch it)
        toks = []
        comp = wait_for(lambda: (lambda r: (toks.extend(r.tokens), r.completions[0] if r.completions else None)[1])(
            self.a.step([rid], wait_ms=1000)), "alice's request completed")
        self.assertEqual((comp.finish_reason, len(toks)), (pb.LENGTH, 3))


class SharedPrefixOption(unittest.TestCase):
    def test_tenants_that_trust_each_other_may_share_prefixes(self):
        srv = Server("--token-file", TOKENS, "--share-prefix-across-tenants", "--threads", "1").start()
        try:
            ids = rand_ids(40, 1206)
            _, ca = srv.client(ALICE).run_stream(greq(ids=ids, max_tokens=2, ignore_eos=True))
            _, cb = srv.client(BOB).run_stream(greq(ids=ids, max_tokens=2, ignore_eos=True))
            self.assertEqual((ca[0].usage.cached_tokens, cb[0].usage.cached_tokens), (0, 32))
            self.assertEqual(list(ca[0].token_ids), list(cb[0].token_ids))
            srv.stop()
        finally:
            srv.kill()


class ExportKey(unittest.TestCase):
    """--export-key: exports move between servers (restarts, replicas) that hold the same key, and only those."""

    def test_the_same_key_imports_another_key_refuses(self):
        k1, k2 = key_file("export-key-1", 0x11), key_file("export-key-2", 0x22)
        a = Server("--token-file", TOKENS, "--export-key", k1, "--threads", "1").start()
        b = Server("--token-file", TOKENS, "--export-key", k1, "--threads", "1").start()
        c = Server("--token-file", TOKENS, "--export-key", k2, "--threads", "1").start()
        d = Server("--token-file", TOKENS, "--threads", "1").start()  # a key of its own, made at start
        try:
            ca = a.client(ALICE)
            ids = rand_ids(12, 1207)
            ca.run_stream(greq(ids=ids, max_tokens=3, ignore_eos=True, agent_id="mover"))
            data = ca.export_agent("mover")
            info = b.client(ALICE).import_agent("mover", data)
            self.assertEqual(info.tokens, 15)
            _, x = ca.run_stream(greq(ids=[5, 6], max_tokens=4, ignore_eos=True, agent_id="mover"))
            _, y = b.client(ALICE).run_stream(greq(ids=[5, 6], max_tokens=4, ignore_eos=True, agent_id="mover"))
            self.assertEqual(list(x[0].token_ids), list(y[0].token_ids), "the moved agent continues identically")
            for name, srv in (("another key", c), ("a key made at start", d)):
                code, details = code_of(lambda: srv.client(ALICE).import_agent("mover", data))
                self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {details}")
            self.assertIn("agent exports are signed with a key made at start", d.log())
            self.assertNotIn("made at start", a.log())
            for s in (a, b, c, d):
                s.stop()
        finally:
            for s in (a, b, c, d):
                s.kill()

    def test_a_bad_key_file_fails_at_start(self):
        short = os.path.join(TMP, "short-key")
        with open(short, "wb") as f:
            f.write(b"too short")
        for path, expect in ((short, "shorter than 32 bytes"), (os.path.join(TMP, "no-such-key"), "no-such-key")):
            rc, err, _ = run_failing(["--export-key", path])
            self.assertEqual(rc, 2, err)
            lines = [l for l in error_lines(err) if l.startswith("kvserve: ")]
            self.assertEqual(len(lines), 1, err)
            self.assertIn("--export-key", lines[0])
            self.assertIn(expect, lines[0])


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-tenant-isolation"))
