#!/usr/bin/python3
"""SIGTERM: health watchers hear NOT_SERVING once new calls are refused, streams finish within the
grace (or are cancelled after it) and the server exits 0.

    /usr/bin/python3 tests/rpc/test_shutdown.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
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


# ---- health and shutdown ---------------------------------------------------------------------
class T8_Shutdown(unittest.TestCase):
    def test_health_watch_reports_not_serving_on_sigterm(self):
        srv = Server("--threads", "1").start()
        try:
            self._watch_across_shutdown(srv)
        finally:
            srv.kill()

    def _watch_across_shutdown(self, srv):
        c = srv.client()
        self.assertEqual(c.health("kvserve.v1.Generation"), SERVING)
        code, _ = code_of(lambda: c.health("no.such.Service"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        w = c.watch(timeout=BOUND)
        it = iter(w)
        self.assertEqual(next(it).status, SERVING)
        srv.terminate()
        seen, end = [], None
        try:
            for m in it:
                seen.append(m.status)
        except grpc.RpcError as e:
            end = e.code()
        self.assertIn(NOT_SERVING, seen, f"watch saw {seen} then ended with {end}")
        self.assertNotEqual(end, grpc.StatusCode.DEADLINE_EXCEEDED, "the watch should end at shutdown")
        rc = srv.wait(BOUND)
        srv.close_channels()
        srv.assert_clean(rc)

    def _streams(self, c, reqs, results, started):
        def run(i):
            toks, comps, err = [], [], None
            try:
                for ev in c.stream(reqs[i], timeout=BOUND):
                    if ev.WhichOneof("event") == "token":
                        toks.append(ev.token)
                        if len(toks) == 2:
                            started[i].set()
                    else:
                        comps.append(ev.completion)
            except grpc.RpcError as e:
                err = (e.code(), e.details())
            started[i].set()
            results[i] = (toks, comps, err)
        ths = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(reqs))]
        for t in ths:
            t.start()
        return ths

    def _not_serving(self, watch_it):
        """Read a Health watch until NOT_SERVING: from then on the server refuses new calls."""
        for m in watch_it:
            if m.status == NOT_SERVING:
                return
        self.fail("the health watch ended without NOT_SERVING")

    def test_sigterm_lets_running_streams_finish_within_grace(self):
        srv = Server("--threads", "1", "--grace", "600").start()
        try:
            c = srv.client()
            watch = iter(c.watch(timeout=BOUND))
            self.assertEqual(next(watch).status, SERVING)
            srv.hold(2)  # the streams are running at SIGTERM, whatever the machine's speed
            n = 4
            reqs = [greq(prompt=f"Story number {i}", max_tokens=24, ignore_eos=True) for i in range(n)]
            results, started = [None] * n, [threading.Event() for _ in range(n)]
            ths = self._streams(c, reqs, results, started)
            for e in started:
                self.assertTrue(e.wait(BOUND), "streams did not start")
            srv.terminate()
            self._not_serving(watch)
            code, details = code_of(lambda: c.submit(greq(prompt="late"), timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, f"a call after SIGTERM: {details}")
            code, _ = code_of(lambda: srv.client().stats(timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, "a new channel after SIGTERM")
            self.assertTrue(all(r is None for r in results), "a held stream ended before its release")
            srv.release()
            for t in ths:
                t.join(BOUND)
            for i, r in enumerate(results):
                self.assertIsNotNone(r, f"stream {i} did not end")
                toks, comps, err = r
                self.assertIsNone(err, f"stream {i} ended with {err} after {len(toks)} tokens")
                self.assertEqual(len(toks), 24)
                self.assertEqual([x.finish_reason for x in comps], [pb.LENGTH])
            # the last stream done, the server exits without sitting out its 600 s grace
            rc = srv.wait(BOUND)
            srv.close_channels()
            srv.assert_clean(rc)
        finally:
            srv.kill()

    def test_sigterm_cancels_streams_left_after_the_grace(self):
        srv = Server("--threads", "1", "--grace", "0.5").start()
        try:
            c = srv.client()
            srv.hold(2)  # never released: only the end of the grace can end these streams
            n = 3
            reqs = [greq(prompt=f"Endless {i}", max_tokens=100, ignore_eos=True) for i in range(n)]
            results, started = [None] * n, [threading.Event() for _ in range(n)]
            ths = self._streams(c, reqs, results, started)
            for e in started:
                self.assertTrue(e.wait(BOUND), "streams did not start")
            srv.terminate()
            for t in ths:
                t.join(BOUND)
            for i, r in enumerate(results):
                self.assertIsNotNone(r, f"stream {i} still running {BOUND} s after SIGTERM with --grace 0.5")
                toks, comps, err = r
                self.assertEqual(len(toks), 2)
                ok = (err and err[0] == grpc.StatusCode.CANCELLED) or (
                    err is None and [x.finish_reason for x in comps] == [pb.CANCELLED])
                self.assertTrue(ok, f"stream {i}: status {err}, completions {[x.finish_reason for x in comps]}")
            rc = srv.wait(BOUND)
            srv.close_channels()
            srv.assert_clean(rc)
        finally:
            srv.kill()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-shutdown"))
