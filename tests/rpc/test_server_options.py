#!/usr/bin/python3
"""Metrics (/metrics and /metrics/cache/statistics exact after a scripted sequence), the OpenBLAS
kernel switch on AVX-512 CPUs, and the precision flags (--weights bf16 --kv f16) over gRPC.

    /usr/bin/python3 tests/rpc/test_server_options.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
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


class T10_Metrics(unittest.TestCase):
    def test_every_metric_exact_after_a_scripted_sequence(self):
        redis = Redis().start()
        mport = free_port()
        srv = Server("--redis", redis.url(), "--metrics", f"127.0.0.1:{mport}", "--price-per-1k", "2.5",
                     "--threads", "1").start()
        try:
            c = srv.client()
            ch = c.ch
            cstats = unary(ch, "/kvserve.v1.Cache/Stats", pb.CacheStatsRequest, pb.CacheStatsReply)
            inv = unary(ch, "/kvserve.v1.Cache/Invalidate", pb.InvalidateRequest, pb.InvalidateReply)
            store = unary(ch, "/kvserve.v1.Cache/RagStore", pb.RagStoreRequest, pb.RagStoreReply)
            look = unary(ch, "/kvserve.v1.Cache/RagLookup", pb.RagLookupRequest, pb.RagLookupReply)
            req = greq(prompt="Metrics please", max_tokens=7, ignore_eos=True)
            _, comps = c.run_stream(req)                       # a miss: the engine runs
            prompt_tokens = comps[0].usage.prompt_tokens
            wait_for(lambda: cstats(pb.CacheStatsRequest(), timeout=BOUND).llm.writes >= 1,  # asynchronous
                     "the completion written to the cache")
            _, comps2 = c.run_stream(req)                      # a hit
            self.assertTrue(comps2[0].cached)
            code, _ = code_of(lambda: c.submit(greq(prompt="", max_tokens=4)))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
            inv(pb.InvalidateRequest(namespace=""), timeout=BOUND)
            common = dict(namespace="kb", embedding_model="m", top_k=3, embedding=[1.0, 0.0, 0.0])
            store(pb.RagStoreRequest(query="q1", result=b"r", **common), timeout=BOUND)
            self.assertTrue(look(pb.RagLookupRequest(query="q1", **common), timeout=BOUND).hit)
            self.assertFalse(look(pb.RagLookupRequest(query="q2", namespace="kb", embedding_model="m", top_k=3,
                                                      embedding=[0.0, 1.0, 0.0]), timeout=BOUND).hit)
            wait_for(lambda: scrape(mport)["kvserve_cache_purged_keys_total"] >= 1,  # the background purge
                     "the invalidated entry purged")
            got = scrape(mport)
            G = "/kvserve.v1.Generation/"
            want = {
                f'kvserve_requests_total{{method="{G}Stream",code="OK"}}': 2,
                f'kvserve_requests_total{{method="{G}Submit",code="INVALID_ARGUMENT"}}': 1,
                'kvserve_requests_total{method="/kvserve.v1.Cache/Invalidate",code="OK"}': 1,
                'kvserve_requests_total{method="/kvserve.v1.Cache/RagStore",code="OK"}': 1,
                'kvserve_requests_total{method="/kvserve.v1.Cache/RagLookup",code="OK"}': 2,
                'kvserve_cache_hits_total{layer="llm"}': 1,
                'kvserve_cache_misses_total{layer="llm"}': 1,
                'kvserve_cache_writes_total{layer="llm"}': 1,
                'kvserve_cache_invalidations_total{layer="llm"}': 1,
                'kvserve_cache_errors_total{layer="llm"}': 0,
                'kvserve_cache_hits_total{layer="rag"}': 1,
                'kvserve_cache_misses_total{layer="rag"}': 1,
                'kvserve_cache_writes_total{layer="rag"}': 1,
                'kvserve_cache_errors_total{layer="rag"}': 0,
                'kvserve_cache_tokens_saved_total': prompt_tokens + 7,
                'kvserve_cache_cost_saved_total': (prompt_tokens + 7) / 1000 * 2.5,
                'kvserve_tokens_total{kind="prompt"}': prompt_tokens,
                'kvserve_tokens_total{kind="generated"}': 7,
                'kvserve_time_to_first_token_seconds_count': 1,
                'kvserve_inter_token_latency_seconds_count': 6,
                'kvserve_kv_blocks{state="used"}': 0,
                'kvserve_requests_running': 0,
                'kvserve_requests_queued': 0,
                # the batcher: 2 Streams and 1 Submit, one at a time
                'kvserve_batched_requests_total': 3,
                'kvserve_batch_size_count': 3,
                'kvserve_batch_size_sum': 3,
                'kvserve_batch_size_bucket{le="1"}': 3,
                'kvserve_batcher_dropped_total{reason="rejected"}': 0,
                'kvserve_batcher_dropped_total{reason="expired"}': 0,
                'kvserve_batcher_dropped_total{reason="cancelled"}': 0,
                'kvserve_batcher_dropped_total{reason="shutdown"}': 0,
                'kvserve_batcher_queued': 0,
                'kvserve_cache_purged_keys_total': 1,   # the invalidated namespace's one entry, in the background
            }
            for k, v in want.items():
                self.assertIn(k, got, f"metric {k} missing")
                self.assertAlmostEqual(got[k], v, places=6, msg=k)
            self.assertGreaterEqual(got['kvserve_engine_step_tokens_count'], 7)
            js = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics/cache/statistics",
                                                   timeout=BOUND).read())
            self.assertTrue(js["enabled"])
            self.assertAlmostEqual(js["llm"]["hit_rate"], 0.5)
            self.assertAlmostEqual(js["rag"]["hit_rate"], 0.5)
            self.assertAlmostEqual(js["combined"]["hit_rate"], 0.5)
            self.assertEqual(js["tokens_saved"], prompt_tokens + 7)
            # a Submitted generation: its tokens wait for Step, no Stream latency to count
            c.run_submit(greq(prompt="Submitted, not streamed", max_tokens=3, ignore_eos=True))
            got = scrape(mport)
            self.assertEqual(got['kvserve_time_to_first_token_seconds_count'], 1)
            self.assertEqual(got['kvserve_inter_token_latency_seconds_count'], 6)
            srv.stop()
        finally:
            srv.kill()
            redis.stop()


def cpu_has_avx512():
    with open("/proc/cpuinfo") as f:
        flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    return all(x in flags for x in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


class T13_BlasKernels(unittest.TestCase):
    """OpenBLAS told to run AVX2 kernels (OPENBLAS_CORETYPE=Haswell) on an AVX-512 CPU: kvserve switches."""

    def core_in_log(self, **env):
        srv = Server(env=dict(os.environ, OPENBLAS_CORETYPE="Haswell", **env)).start()
        try:
            srv.stop()
        finally:
            srv.kill()
        line = [l for l in srv.log().splitlines() if "BLAS kernels" in l]
        self.assertEqual(len(line), 1, srv.log())
        return line[0].split("BLAS kernels ")[1].split(";")[0], srv.log()

    def test_avx512_kernels_chosen_unless_kept(self):
        if not cpu_has_avx512():
            self.skipTest("the CPU has no AVX-512: OpenBLAS's choice stands")
        core, log = self.core_in_log(KVSERVE_BLAS_CORE="auto")
        self.assertEqual(core, "SkylakeX")
        self.assertIn("would have run its Haswell kernels", log)
        core, _ = self.core_in_log(KVSERVE_BLAS_CORE="keep")
        self.assertEqual(core, "Haswell")


class T14_Precision(unittest.TestCase):
    """--weights bf16 and --kv f16 through the server: the same tokens as `kvserve generate` with the
    same flags (the reference tests check those against numpy), and bad values refused at start."""

    def test_server_precision_flags_match_the_cli(self):
        ids = rand_ids(24, 91)
        flags = ["--weights", "bf16", "--kv", "f16"]
        cli = subprocess.run([ARGS.kvserve, "generate", "--model", ARGS.model, "--ids", " ".join(map(str, ids)),
                              "-n", "20", "--temperature", "0", "--ignore-eos", "--print-ids"] + flags,
                             capture_output=True, text=True, timeout=BOUND, check=True).stdout.split()
        srv = Server(*flags).start()
        try:
            _, comps = srv.client().run_stream(greq(ids=ids, max_tokens=20, ignore_eos=True))
            self.assertEqual([str(t) for t in comps[0].token_ids], cli)
            self.assertIn("weights held in BF16", srv.log())
            self.assertIn("F16 KV blocks", srv.log())
            srv.stop()
        finally:
            srv.kill()
        for bad in (["--weights", "f8"], ["--kv", "bf16"]):
            rc, err, _ = run_failing(bad)
            self.assertEqual(rc, 2, err)
            self.assertIn(bad[0], err)


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-server-options"))
