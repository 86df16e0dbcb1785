#!/usr/bin/python3
"""Nothing blocks the completion-queue threads: with Redis stopped (SIGSTOP, calls into it waiting
on a 600 s timeout) and with a 10 MB prompt being tokenized, health checks and uncached Streams
keep their latency.

    /usr/bin/python3 tests/rpc/test_blocking.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto

The calls that may block run on worker pools (server/workers.c): the Cache service's on one, so a
stalled Redis holds only those; Submit/Stream (rendering, tokenization) and agent export/import on
another. Latency is compared with the same calls measured just before on the same server, with a
generous factor: nothing here depends on the machine's speed. Before the pools, the first check
timed out (every completion-queue thread waited in Redis). A last test runs every request path
at once (Streams, single-flight, Submit + Step, Cancel, health, metrics) to exercise the order of
the request lock and the server lock (server/internal.h). Harness: tests/rpc/harness.py.
"""
import os
import signal
import statistics
import sys
import threading
import time
import unittest

import grpc

import harness
from harness import *  # noqa: F401,F403


def bypass_stream(c, seed):
    req = greq(ids=rand_ids(8, seed), max_tokens=4, ignore_eos=True, cache=pb.CachePolicy(mode=pb.CachePolicy.BYPASS))
    t0 = time.monotonic()
    toks, comps = c.run_stream(req)
    assert len(toks) == 4 and len(comps) == 1, (toks, comps)
    return time.monotonic() - t0


def timed_health(c):
    t0 = time.monotonic()
    assert c.health() == SERVING
    return time.monotonic() - t0


def latencies(c, n_health=10, n_streams=3, seed=0):
    return ([timed_health(c) for _ in range(n_health)], [bypass_stream(c, seed + i) for i in range(n_streams)])


def bound(before):
    """A generous bound relative to the latency just measured (a worst case of 20x, plus 2 s)."""
    return 20 * max(before) + 2.0


class Blocking(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.redis = Redis().start()
        cls.srv = Server("--redis", cls.redis.url(), "--redis-timeout-ms", "600000").start()
        cls.c = cls.srv.client()

    @classmethod
    def tearDownClass(cls):
        try:
            if cls.redis.proc:
                os.kill(cls.redis.proc.pid, signal.SIGCONT)
            cls.srv.stop()
        finally:
            cls.srv.kill()
            cls.redis.stop()

    def check_latency(self, before, after, what):
        for name, b, a in (("health check", before[0], after[0]), ("uncached Stream", before[1], after[1])):
            self.assertLessEqual(max(a), bound(b), f"{name} latency with {what}: {max(a):.3f}s, before {max(b):.3f}s "
                                 f"(median {statistics.median(a):.4f}s vs {statistics.median(b):.4f}s)")

    def test_a_stalled_redis_holds_only_the_cache_calls(self):
        store = unary(self.c.ch, "/kvserve.v1.Cache/RagStore", pb.RagStoreRequest, pb.RagStoreReply)
        look = unary(self.c.ch, "/kvserve.v1.Cache/RagLookup", pb.RagLookupRequest, pb.RagLookupReply)
        common = dict(namespace="kb", embedding_model="m", top_k=2)
        emb = [1.0] + [0.0] * 63
        self.assertTrue(store(pb.RagStoreRequest(query="q", embedding=emb, result=b"r", **common), timeout=BOUND).stored)
        before = latencies(self.c)
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        done, errors = [], []

        def stuck(i):  # each waits in Redis until SIGCONT
            try:
                look(pb.RagLookupRequest(query="q%d" % i, embedding=emb, **common), timeout=BOUND)
            except grpc.RpcError as e:
                errors.append(e.code())
            done.append(i)
        threads = [threading.Thread(target=stuck, args=(i,)) for i in range(4)]  # more than the CQ threads
        for t in threads:
            t.start()
        try:
            after = latencies(self.c, seed=100)
            self.assertEqual(done, [], "the Redis calls were meant to be waiting in the stopped Redis meanwhile")
        finally:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
        for t in threads:
            t.join(BOUND)
        self.check_latency(before, after, "4 calls waiting in a stopped Redis")
        self.assertEqual(sorted(done), [0, 1, 2, 3])

    def test_a_huge_prompt_holds_only_itself(self):
        words = "the model serves tokens quickly and well of a cat".split()
        rng = __import__("random").Random(5)
        big = " ".join(rng.choice(words) for _ in range(2_000_000))  # ~10 MB: seconds of tokenization
        before = latencies(self.c, seed=200)
        result = {}

        def submit_big():
            t0 = time.monotonic()
            result["code"] = code_of(lambda: self.c.submit(greq(big, max_tokens=4)))[0]
            result["t"] = (t0, time.monotonic())
        t = threading.Thread(target=submit_big)
        t.start()
        health, streams, overlapped = [], [], 0
        while t.is_alive() and len(streams) < 20:
            health.append(timed_health(self.c))
            streams.append(bypass_stream(self.c, 300 + len(streams)))
            if t.is_alive():
                overlapped += 1
        t.join(BOUND)
        self.assertEqual(result.get("code"), grpc.StatusCode.INVALID_ARGUMENT)  # it is longer than the context
        if overlapped < 2:
            self.skipTest(f"the 10 MB prompt took only {result['t'][1] - result['t'][0]:.2f}s: too few calls overlapped it")
        self.check_latency(before, (health, streams), "a 10 MB prompt in flight")


class EveryPathAtOnce(unittest.TestCase):
    """The request lock (srv.rq_mu) and the server lock (srv.mu) taken in every order the code
    allows at once: Streams (some identical and cacheable, so that single-flight followers are
    answered under the request lock), Submit + long-polling Step, Cancel of running requests,
    health checks and metrics scrapes. Nothing deadlocks (every call within BOUND), each output
    equals the same request's output alone, and the pool is whole afterwards."""

    def test_concurrent_paths_agree_with_solo_runs(self):
        redis = Redis().start()
        mport = free_port()
        srv = Server("--redis", redis.url(), "--metrics", f"127.0.0.1:{mport}").start()
        try:
            c = srv.client()
            bypass = pb.CachePolicy(mode=pb.CachePolicy.BYPASS)
            reqs = [greq(ids=rand_ids(6 + i, 900 + i), max_tokens=6, ignore_eos=True, cache=bypass) for i in range(4)]
            shared = greq(ids=rand_ids(9, 990), max_tokens=6, ignore_eos=True)  # cacheable: greedy
            solo = [list(c.run_stream(r)[1][0].token_ids) for r in reqs]
            solo_shared = list(c.run_stream(greq(ids=rand_ids(9, 990), max_tokens=6, ignore_eos=True,
                                                 cache=bypass))[1][0].token_ids)
            errors, outs = [], {}

            def guard(name, fn):
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 -- reported below with its thread
                    errors.append(f"{name}: {e!r}")

            def streams(k):
                for rep in range(3):
                    outs.setdefault(("stream", k), []).append(list(c.run_stream(reqs[k])[1][0].token_ids))

            def shared_streams(k):
                for rep in range(3):
                    outs.setdefault(("shared", k), []).append(list(c.run_stream(shared)[1][0].token_ids))

            def submits(k):
                for rep in range(3):
                    outs.setdefault(("submit", k), []).append(list(c.run_submit(reqs[k])[2].token_ids))

            def cancels():
                for rep in range(6):
                    id_ = c.submit(greq(ids=rand_ids(8, 950 + rep), max_tokens=200, ignore_eos=True, cache=bypass))
                    try:
                        c.cancel(id_)
                    except grpc.RpcError as e:  # NOT_FOUND: it had already finished
                        assert e.code() == grpc.StatusCode.NOT_FOUND, e
                    got = None
                    until = time.monotonic() + BOUND
                    while got is None and time.monotonic() < until:
                        rep_ = c.step([id_], wait_ms=500)
                        got = rep_.completions[0] if rep_.completions else None
                    assert got is not None, f"no completion for cancelled request {id_}"

            def probes():
                for _ in range(40):
                    assert c.health() == SERVING
                    scrape(mport)

            threads = ([threading.Thread(target=guard, args=(f"stream{k}", lambda k=k: streams(k))) for k in range(2)] +
                       [threading.Thread(target=guard, args=(f"shared{k}", lambda k=k: shared_streams(k))) for k in range(3)] +
                       [threading.Thread(target=guard, args=(f"submit{k}", lambda k=k: submits(k))) for k in (2, 3)] +
                       [threading.Thread(target=guard, args=("cancel", cancels)),
                        threading.Thread(target=guard, args=("probe", probes))])
            for t in threads:
                t.start()
            for t in threads:
                t.join(BOUND)
            self.assertFalse([t for t in threads if t.is_alive()], "calls still running after BOUND: a deadlock?")
            self.assertEqual(errors, [])
            for (kind, k), got in outs.items():
                want = solo_shared if kind == "shared" else solo[k]
                self.assertEqual(got, [want] * 3, f"{kind} {k}")
            c.wait_idle()
        finally:
            srv.stop()
            redis.stop()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-blocking"))
