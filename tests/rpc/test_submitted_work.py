#!/usr/bin/python3
"""Work started by Submit is not lost and not unbounded: on SIGTERM, Submitted requests finish
within the grace (or complete as CANCELLED at its end) and Step collects them until the server
exits; each tenant may leave at most --max-results requests uncollected (RESOURCE_EXHAUSTED
beyond, other tenants unaffected), and a result waits --result-ttl seconds for Step.

    /usr/bin/python3 tests/rpc/test_submitted_work.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto

Regressions of issue 12's findings 9 and 10. Harness: tests/rpc/harness.py.
"""
import os
import sys
import threading
import unittest

import grpc

import harness
from harness import *  # noqa: F401,F403

ALICE, BOB = "tok-alice-9a", "tok-bob-9b"


def tokens_file():
    path = os.path.join(TMP, "submitted-tokens")
    with open(path, "w") as f:
        f.write(f"{ALICE} alice\n{BOB} bob\n")
    return path


def collect(c, ids, limit=BOUND):
    """Step (long-polling) until every id has its completion: {id: (token indices, completion)}."""
    got = {i: ([], None) for i in ids}
    wait_for(lambda: all(got[i][1] for i in ids) or step_into(c, [i for i in ids if not got[i][1]], got),
             f"completions of {ids}", limit=limit, every=0)
    return got


def step_into(c, ids, got):
    rep = c.step(ids, wait_ms=1000)
    for t in rep.tokens:
        got[t.id][0].append(t.index)
    for comp in rep.completions:
        got[comp.id] = (got[comp.id][0], comp)
    return all(got[i][1] for i in got)


class Shutdown(unittest.TestCase):
    def test_sigterm_lets_submitted_requests_finish_and_be_collected(self):
        mport = free_port()
        srv = Server("--threads", "1", "--grace", "600", "--metrics", f"127.0.0.1:{mport}").start()
        try:
            c = srv.client()
            watch = iter(c.watch(timeout=BOUND))
            self.assertEqual(next(watch).status, SERVING)
            srv.hold(2)
            ids = [c.submit(greq(ids=rand_ids(8, 900 + i), max_tokens=24, ignore_eos=True)) for i in range(3)]
            first = {i: ([], None) for i in ids}
            wait_for(lambda: (step_into(c, ids, first), all(len(first[i][0]) == 2 for i in ids))[1],
                     "two tokens of each request")
            srv.terminate()
            wait_for(lambda: next(watch).status == NOT_SERVING, "NOT_SERVING after SIGTERM")
            code, details = code_of(lambda: c.submit(greq(prompt="late", max_tokens=2)))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, f"a new Submit while draining: {details}")
            self.assertEqual(list(c.step(ids, wait_ms=0).tokens), [], "Step works while draining")
            srv.release()
            got = collect(c, ids)
            for i in ids:
                idx, comp = got[i]
                self.assertEqual(first[i][0] + idx, list(range(24)), f"request {i}: tokens lost")
                self.assertEqual((comp.finish_reason, comp.usage.generated_tokens), (pb.LENGTH, 24))
            rc = srv.wait(BOUND)  # everything collected: it exits without sitting out the 600 s grace
            srv.close_channels()
            srv.assert_clean(rc)
        finally:
            srv.kill()

    def test_at_the_end_of_the_grace_submitted_requests_complete_as_cancelled(self):
        mport = free_port()
        srv = Server("--threads", "1", "--grace", "0.5", "--metrics", f"127.0.0.1:{mport}").start()
        try:
            c = srv.client()
            srv.hold(1)  # never released: only the end of the grace ends it
            rid = c.submit(greq(ids=rand_ids(8, 910), max_tokens=50, ignore_eos=True))
            got = {rid: ([], None)}
            wait_for(lambda: (step_into(c, [rid], got), len(got[rid][0]) == 1)[1], "the first token")
            result = []
            t = threading.Thread(target=lambda: result.append(c.step([rid], wait_ms=600000, timeout=BOUND)))
            t.start()
            wait_for(lambda: scrape(mport)["kvserve_steps_parked"] == 1, "a Step parked on the held request")
            srv.terminate()
            t.join(BOUND)
            self.assertEqual(len(result), 1, "the parked Step got no answer")
            comps = list(result[0].completions)
            self.assertEqual(len(comps), 1, f"no completion in {result[0]}")
            self.assertEqual((comps[0].finish_reason, comps[0].usage.generated_tokens), (pb.CANCELLED, 1))
            rc = srv.wait(BOUND)
            srv.close_channels()
            srv.assert_clean(rc)
        finally:
            srv.kill()


class Bounds(unittest.TestCase):
    def test_uncollected_results_are_bounded_per_tenant(self):
        srv = Server("--threads", "1", "--token-file", tokens_file(), "--max-results", "5").start()
        try:
            a, b = srv.client(ALICE), srv.client(BOB)
            ids = [a.submit(greq(ids=rand_ids(4, 920 + i), max_tokens=2, ignore_eos=True)) for i in range(5)]
            code, details = code_of(lambda: a.submit(greq(prompt="one too many", max_tokens=2)))
            self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
            self.assertIn("--max-results", details)
            # streams are bounded by their calls, not by this; and bob is not affected
            _, comps = a.run_stream(greq(prompt="a stream", max_tokens=2))
            self.assertEqual(len(comps), 1)
            bid = b.submit(greq(prompt="bob's", max_tokens=2))
            collect(b, [bid])
            # collecting one makes room for one
            collect(a, ids[:1])
            more = a.submit(greq(prompt="room again", max_tokens=2))
            code, _ = code_of(lambda: a.submit(greq(prompt="full again", max_tokens=2)))
            self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)
            collect(a, ids[1:] + [more])
            srv.stop()
        finally:
            srv.kill()

    def test_a_result_waits_result_ttl_for_step(self):
        mport = free_port()
        srv = Server("--threads", "1", "--result-ttl", "1", "--max-results", "1",
                     "--metrics", f"127.0.0.1:{mport}").start()
        try:
            c = srv.client()
            rid = c.submit(greq(prompt="forgotten", max_tokens=2))
            wait_for(lambda: c.stats().running == 0 and c.stats().waiting == 0, "the request finished")
            wait_for(lambda: scrape(mport)["kvserve_requests_known"] == 0,
                     "the uncollected result forgotten after --result-ttl 1")
            code, details = code_of(lambda: c.step([rid]))
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, details)
            collect(c, [c.submit(greq(prompt="room again", max_tokens=2))])  # the bound counts it no more
            srv.stop()
        finally:
            srv.kill()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-submitted-work"))
