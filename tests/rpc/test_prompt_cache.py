#!/usr/bin/python3
"""The prompt and RAG caches through the server with a real Redis (hits streamed like generations,
policies, tenants, namespaces, Invalidate, Redis dying and coming back), single-flight, and the
request batcher (windows, departures and deadlines while waiting, a full queue, a stalled Redis
failing open).

    /usr/bin/python3 tests/rpc/test_prompt_cache.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [-k PATTERN] [-v]

Harness (servers, clients, Redis, the hold hook, bounded waits): tests/rpc/harness.py; nothing
here depends on the machine's speed.
"""
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.request

import grpc

import harness
from harness import *  # noqa: F401,F403 - Server, Client, Redis, greq, wait_for, BOUND, pb, ...


# ---- the prompt cache on a real redis-server ---------------------------------------------------
class T9_PromptCache(unittest.TestCase):
    def setUp(self):
        self.redis = Redis().start()
        tokfile = os.path.join(TMP, "cache-tokens")
        with open(tokfile, "w") as f:
            f.write("tok-a alice\ntok-b bob\n")
        self.srv = Server("--redis", self.redis.url(), "--token-file", tokfile, "--threads", "1").start()
        self.a = self.srv.client("tok-a")
        self.b = self.srv.client("tok-b")

    def tearDown(self):
        try:
            self.srv.stop()
        finally:
            self.srv.kill()
            self.redis.stop()

    def comp(self, c, req):
        toks, comps = c.run_stream(req)
        self.assertEqual(len(comps), 1)
        return toks, comps[0]

    def wait_cached(self, c, req, limit=BOUND):
        """The write happens after the completion: poll until a hit."""
        until = time.monotonic() + limit
        while time.monotonic() < until:
            toks, comp = self.comp(c, req)
            if comp.cached:
                return toks, comp
            time.sleep(0.02)
        self.fail(f"never answered from the cache within {limit}s")

    def writes_settled(self, c):
        """Every cache write queued so far is done: the writer works first in, first out, so once a
        fresh request's own write has landed, those queued before it have too."""
        self.sentinels = getattr(self, "sentinels", 0) + 1
        req = greq(prompt=f"sentinel {self.sentinels}", max_tokens=2, ignore_eos=True, namespace="sentinels")
        self.comp(c, req)
        self.wait_cached(c, req)

    def test_deterministic_requests_are_answered_from_the_cache(self):
        req = greq(prompt="Cache me if you can", max_tokens=12, ignore_eos=True, namespace="docs")
        toks, first = self.comp(self.a, req)
        self.assertFalse(first.cached)
        toks2, hit = self.wait_cached(self.a, req)
        self.assertEqual(list(hit.token_ids), list(first.token_ids))
        self.assertEqual(hit.text, first.text)
        self.assertEqual("".join(t.text for t in toks2), first.text, "a hit streams like a generation")
        self.assertEqual([t.index for t in toks2], list(range(12)))
        self.assertEqual(hit.usage.generated_tokens, 12)
        # Submit/Step gets the cached answer too
        id_ = self.a.submit(req)
        rep = self.a.step([id_])
        self.assertEqual(len(rep.completions), 1)
        self.assertTrue(rep.completions[0].cached)
        self.assertEqual(list(rep.completions[0].token_ids), list(first.token_ids))
        # seeded sampling is deterministic too
        sreq = greq(prompt="Seeded", max_tokens=8, ignore_eos=True, sampling=dict(temperature=0.9, seed=5))
        _, s1 = self.comp(self.a, sreq)
        _, s2 = self.wait_cached(self.a, sreq)
        self.assertEqual(list(s1.token_ids), list(s2.token_ids))

    def test_policies_tenants_namespaces_and_nondeterminism(self):
        req = greq(prompt="Policy test", max_tokens=6, ignore_eos=True)
        self.comp(self.a, req)
        self.wait_cached(self.a, req)
        _, c = self.comp(self.b, req)
        self.assertFalse(c.cached, "tenant B got tenant A's entry")
        other_ns = greq(prompt="Policy test", max_tokens=6, ignore_eos=True, namespace="other")
        _, c = self.comp(self.a, other_ns)
        self.assertFalse(c.cached, "another namespace hit")
        bypass = greq(prompt="Policy test", max_tokens=6, ignore_eos=True,
                      cache=pb.CachePolicy(mode=pb.CachePolicy.BYPASS))
        _, c = self.comp(self.a, bypass)
        self.assertFalse(c.cached)
        refresh = greq(prompt="Policy test", max_tokens=6, ignore_eos=True,
                       cache=pb.CachePolicy(mode=pb.CachePolicy.REFRESH))
        _, c = self.comp(self.a, refresh)
        self.assertFalse(c.cached, "REFRESH must recompute")
        rnd = greq(prompt="Random", max_tokens=6, ignore_eos=True, sampling=dict(temperature=0.9))
        self.comp(self.a, rnd)
        self.writes_settled(self.a)  # a write of it, had there been one, is done now
        _, c = self.comp(self.a, rnd)
        self.assertFalse(c.cached, "random sampling without a seed must not be cached by default")
        rnd_ok = greq(prompt="Random", max_tokens=6, ignore_eos=True, sampling=dict(temperature=0.9),
                      cache=pb.CachePolicy(cache_nondeterministic=True))
        self.comp(self.a, rnd_ok)
        self.wait_cached(self.a, rnd_ok)
        agent = greq(prompt="Agent turn", max_tokens=4, ignore_eos=True, agent_id="ag")
        self.comp(self.a, agent)
        self.writes_settled(self.a)
        _, c = self.comp(self.a, greq(prompt="Agent turn", max_tokens=4, ignore_eos=True, agent_id="ag2"))
        self.assertFalse(c.cached, "agent requests are not cached")

    def test_invalidate_namespace_and_stats(self):
        inv = unary(self.a.ch, "/kvserve.v1.Cache/Invalidate", pb.InvalidateRequest, pb.InvalidateReply)
        stats = unary(self.a.ch, "/kvserve.v1.Cache/Stats", pb.CacheStatsRequest, pb.CacheStatsReply)
        md = self.a.md
        req = greq(prompt="Masterplan", max_tokens=6, ignore_eos=True, namespace="plan")
        keep = greq(prompt="Masterplan", max_tokens=6, ignore_eos=True, namespace="keep")
        self.comp(self.a, req)
        self.comp(self.a, keep)
        self.wait_cached(self.a, req)
        self.wait_cached(self.a, keep)
        st = stats(pb.CacheStatsRequest(), timeout=BOUND, metadata=md)
        self.assertTrue(st.enabled)
        self.assertGreaterEqual(st.llm.hits, 2)
        self.assertGreaterEqual(st.llm.writes, 2)
        self.assertGreater(st.llm.hit_rate, 0)
        rep = inv(pb.InvalidateRequest(namespace="plan", purge=True), timeout=BOUND, metadata=md)
        self.assertEqual(rep.generation, 1)
        self.assertEqual(rep.purged, 1)
        _, c = self.comp(self.a, req)
        self.assertFalse(c.cached, "an invalidated namespace still hit")
        _, c = self.comp(self.a, keep)
        self.assertTrue(c.cached, "another namespace was dropped too")
        # bob's invalidation of "keep" is his own namespace, not alice's
        inv(pb.InvalidateRequest(namespace="keep"), timeout=BOUND, metadata=self.b.md)
        _, c = self.comp(self.a, keep)
        self.assertTrue(c.cached, "one tenant invalidated another's namespace")
        st2 = stats(pb.CacheStatsRequest(), timeout=BOUND, metadata=md)
        self.assertEqual(st2.llm.invalidations, 2)
        # without purge: the superseded entry is deleted in the background
        bg = greq(prompt="Background", max_tokens=6, ignore_eos=True, namespace="bg")
        self.comp(self.a, bg)
        self.wait_cached(self.a, bg)
        before = self.redis_keys("kvs:p:*")
        rep = inv(pb.InvalidateRequest(namespace="bg"), timeout=BOUND, metadata=md)
        self.assertEqual(rep.purged, 0)
        wait_for(lambda: self.redis_keys("kvs:p:*") == before - 1, "the superseded key purged in the background")

    def redis_keys(self, pattern):
        out = subprocess.run(["redis-cli", "-p", str(self.redis.port), "--scan", "--pattern", pattern],
                             capture_output=True, text=True, timeout=BOUND, check=True).stdout
        return len(out.split())

    def test_rag_store_and_lookup(self):
        store = unary(self.a.ch, "/kvserve.v1.Cache/RagStore", pb.RagStoreRequest, pb.RagStoreReply)
        look = unary(self.a.ch, "/kvserve.v1.Cache/RagLookup", pb.RagLookupRequest, pb.RagLookupReply)
        stats = unary(self.a.ch, "/kvserve.v1.Cache/Stats", pb.CacheStatsRequest, pb.CacheStatsReply)
        A, B = self.a.md, self.b.md

        def vec(c, dim=384):  # cosine c with axis 0, leaning to axis 1, scale 2
            v = [0.0] * dim
            v[0], v[1] = 2 * c, 2 * math.sqrt(1 - c * c)
            return v

        common = dict(namespace="kb", embedding_model="minilm", top_k=5)
        rep = store(pb.RagStoreRequest(query="what is a KV block?", embedding=vec(1.0), result=b"doc-1,doc-2", **common),
                    timeout=BOUND, metadata=A)
        self.assertTrue(rep.stored)
        r = look(pb.RagLookupRequest(query="what is a KV block?", embedding=vec(1.0), **common), timeout=BOUND, metadata=A)
        self.assertTrue(r.hit and r.exact)
        self.assertEqual(r.result, b"doc-1,doc-2")
        r = look(pb.RagLookupRequest(query="define KV blocks", embedding=vec(0.951), **common), timeout=BOUND, metadata=A)
        self.assertTrue(r.hit)
        self.assertFalse(r.exact)
        self.assertAlmostEqual(r.similarity, 0.951, places=3)
        r = look(pb.RagLookupRequest(query="define KV blocks", embedding=vec(0.949), **common), timeout=BOUND, metadata=A)
        self.assertFalse(r.hit, "0.949 hit at threshold 0.95")
        r = look(pb.RagLookupRequest(query="what is a KV block?", embedding=vec(1.0), **common), timeout=BOUND, metadata=B)
        self.assertFalse(r.hit, "tenant B saw tenant A's RAG entry")
        code, details = code_of(lambda: look(pb.RagLookupRequest(query="x", embedding=[1.0] * 128, **common),
                                              timeout=BOUND, metadata=A))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("embedding", details)
        code, _ = code_of(lambda: look(pb.RagLookupRequest(query="x", embedding=[], **common), timeout=BOUND, metadata=A))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        st = stats(pb.CacheStatsRequest(), timeout=BOUND, metadata=A)
        self.assertEqual((st.rag.hits, st.rag.writes), (2, 1))
        self.redis.stop()  # fail-open: no errors, just misses and unstored writes
        r = look(pb.RagLookupRequest(query="define KV blocks", embedding=vec(0.99), **common), timeout=BOUND, metadata=A)
        self.assertFalse(r.hit)
        rep = store(pb.RagStoreRequest(query="q", embedding=vec(1.0), result=b"r", **common), timeout=BOUND, metadata=A)
        self.assertFalse(rep.stored)

    def test_fail_open_when_redis_dies_and_recovery(self):
        req = greq(prompt="Survive", max_tokens=6, ignore_eos=True)
        self.comp(self.a, req)
        self.wait_cached(self.a, req)
        self.redis.stop()
        for _ in range(5):  # every request still succeeds, from the engine
            _, c = self.comp(self.a, req)
            self.assertFalse(c.cached)
            self.assertEqual(c.finish_reason, pb.LENGTH)
        self.redis = Redis(self.redis.port).start()  # an empty Redis on the same port
        req2 = greq(prompt="Back again", max_tokens=6, ignore_eos=True)
        wait_for(lambda: self.comp(self.a, req2)[1].cached, "hits resumed after Redis came back", every=0.2)


class T11_SingleFlight(unittest.TestCase):
    def test_identical_concurrent_streams_run_the_engine_once(self):
        redis = Redis().start()
        mport = free_port()
        srv = Server("--redis", redis.url(), "--metrics", f"127.0.0.1:{mport}", "--threads", "1").start()
        try:
            c = srv.client()
            req = greq(prompt="One flight for all", max_tokens=24, ignore_eos=True)
            srv.hold(1)  # the leader is generating (held at one token) until the followers have joined it
            leader = c.stream(req)
            it = iter(leader)
            first = next(it)
            results = [None] * 3

            def follow(i):
                results[i] = c.run_stream(req)

            ths = [threading.Thread(target=follow, args=(i,)) for i in range(3)]
            for t in ths:
                t.start()
            wait_for(lambda: scrape(mport)["kvserve_cache_singleflight_joined_total"] == 3,
                     "three followers joined the leader's flight")
            srv.release()
            rest = [first] + list(it)
            lead_comp = [e.completion for e in rest if e.WhichOneof("event") == "completion"][0]
            for t in ths:
                t.join(BOUND)
            for toks, comps in results:
                self.assertEqual(len(comps), 1)
                self.assertEqual(list(comps[0].token_ids), list(lead_comp.token_ids))
                self.assertEqual("".join(t.text for t in toks), lead_comp.text)
            m = scrape(mport)
            self.assertEqual(m["kvserve_cache_singleflight_joined_total"], 3)
            self.assertEqual(m['kvserve_tokens_total{kind="generated"}'], 24, "the engine ran more than once")
            srv.stop()
        finally:
            srv.kill()
            redis.stop()


class T12_Batcher(unittest.TestCase):
    """The request batcher in front of the cache and engine (--batch-max, --batch-window-ms, --batch-queue)."""

    def test_a_lone_request_waits_for_its_window(self):
        mport = free_port()
        srv = Server("--metrics", f"127.0.0.1:{mport}", "--batch-window-ms", "1500", "--batch-max", "4",
                     "--threads", "1").start()
        try:
            t0 = time.monotonic()
            _, comps = srv.client().run_stream(greq(prompt="alone", max_tokens=2, ignore_eos=True))
            self.assertEqual(len(comps), 1)
            self.assertGreaterEqual(time.monotonic() - t0, 1.5, "dispatched before its window closed")
            m = scrape(mport)
            self.assertEqual((m["kvserve_batch_size_count"], m['kvserve_batch_size_bucket{le="1"}']), (1, 1))
            srv.stop()
        finally:
            srv.kill()

    def test_max_batch_dispatches_at_once_and_waiting_requests_can_leave(self):
        # a window of a minute: only --batch-max can dispatch within the test, and a request
        # that waits is still waiting when the client leaves or its deadline passes
        mport = free_port()
        srv = Server("--metrics", f"127.0.0.1:{mport}", "--batch-window-ms", "60000", "--batch-max", "4",
                     "--threads", "1").start()
        try:
            c = srv.client()
            results = [None] * 4

            def one(i):
                results[i] = c.run_stream(greq(prompt=f"together {i}", max_tokens=2, ignore_eos=True))

            ths = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for t in ths:
                t.start()
            for t in ths:
                t.join(BOUND)
            self.assertTrue(all(r and len(r[1]) == 1 for r in results), results)
            m = scrape(mport)
            self.assertEqual((m["kvserve_batch_size_count"], m["kvserve_batch_size_sum"]), (1, 4), "one window of 4")
            self.assertEqual(m['kvserve_batch_size_bucket{le="1"}'], 0)
            self.assertEqual(m["kvserve_batched_requests_total"], 4)
            generated = m['kvserve_tokens_total{kind="generated"}']
            # a client that leaves while its request waits: dropped, never run
            call = c.stream(greq(prompt="leaving", max_tokens=8, ignore_eos=True))
            wait_for(lambda: scrape(mport)["kvserve_batcher_queued"] == 1, "the request waiting in the batcher")
            call.cancel()
            wait_for(lambda: scrape(mport)['kvserve_batcher_dropped_total{reason="cancelled"}'] == 1,
                     "the cancelled request dropped from the batcher")
            # a deadline that passes while it waits: DEADLINE_EXCEEDED, never run
            code, _ = code_of(lambda: c.run_stream(greq(prompt="late", max_tokens=8, ignore_eos=True), timeout=0.3))
            self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)

            def dropped():
                m = scrape(mport)
                return m['kvserve_batcher_dropped_total{reason="cancelled"}'] + \
                    m['kvserve_batcher_dropped_total{reason="expired"}'] == 2 and m
            m = wait_for(dropped, "the late request dropped from the batcher")
            self.assertEqual(m["kvserve_batched_requests_total"], 4)
            self.assertEqual(m['kvserve_tokens_total{kind="generated"}'], generated)
            self.assertEqual(m["kvserve_batcher_queued"], 0)
            srv.stop()
        finally:
            srv.kill()

    def test_full_queue_is_resource_exhausted(self):
        # Redis stopped (SIGSTOP) and a 10-minute Redis timeout: the batcher's dispatch sits in its
        # cache lookup for as long as the test needs, and the queue of 2 fills behind it
        redis = Redis().start()
        mport = free_port()
        srv = Server("--redis", redis.url(), "--redis-timeout-ms", "600000", "--metrics", f"127.0.0.1:{mport}",
                     "--batch-max", "1", "--batch-queue", "2", "--batch-window-ms", "0", "--threads", "1").start()
        stopped = False
        try:
            c = srv.client()
            c.run_stream(greq(prompt="warm the pool", max_tokens=2))  # a live Redis connection
            os.kill(redis.proc.pid, signal.SIGSTOP)
            stopped = True
            results = {}

            def one(i):
                try:
                    _, comps = c.run_stream(greq(prompt=f"stalled {i}", max_tokens=2))
                    results[i] = grpc.StatusCode.OK if len(comps) == 1 else comps
                except grpc.RpcError as e:
                    results[i] = (e.code(), e.details())

            ths = [threading.Thread(target=one, args=(0,))]
            ths[0].start()
            wait_for(lambda: scrape(mport)["kvserve_batch_size_count"] == 2, "the first request in dispatch")
            for i in (1, 2):
                ths.append(threading.Thread(target=one, args=(i,)))
                ths[-1].start()
            wait_for(lambda: scrape(mport)["kvserve_batcher_queued"] == 2, "two requests queued behind it")
            code, details = code_of(lambda: c.run_stream(greq(prompt="one too many", max_tokens=2)))
            self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
            self.assertIn("queue is full", details)
            os.kill(redis.proc.pid, signal.SIGCONT)
            stopped = False
            for t in ths:
                t.join(BOUND)
            self.assertEqual(results, {i: grpc.StatusCode.OK for i in range(3)})
            m = scrape(mport)
            self.assertEqual(m['kvserve_batcher_dropped_total{reason="rejected"}'], 1)
            self.assertEqual(m['kvserve_cache_errors_total{layer="llm"}'], 0)
            srv.stop()
        finally:
            if stopped:
                os.kill(redis.proc.pid, signal.SIGCONT)
            srv.kill()
            redis.stop()

    def test_a_stalled_redis_fails_open(self):
        redis = Redis().start()
        mport = free_port()
        srv = Server("--redis", redis.url(), "--metrics", f"127.0.0.1:{mport}", "--threads", "1").start()
        try:
            c = srv.client()
            c.run_stream(greq(prompt="warm the pool", max_tokens=2))
            os.kill(redis.proc.pid, signal.SIGSTOP)  # lookups now time out (200 ms): misses
            try:
                for i in range(3):
                    _, comps = c.run_stream(greq(prompt=f"stalled {i}", max_tokens=2))
                    self.assertEqual([x.finish_reason for x in comps], [pb.LENGTH])
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            self.assertGreaterEqual(scrape(mport)['kvserve_cache_errors_total{layer="llm"}'], 1)
            srv.stop()
        finally:
            srv.kill()
            redis.stop()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-prompt-cache"))
