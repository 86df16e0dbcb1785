#!/usr/bin/python3
"""Generation over gRPC from Python (Debian's python3-grpcio) on the tiny model: unary and streaming
calls, Step with repeated ids, every bad request's status, agents, the pool limit, cancellation
(of held requests: the pool's free count returns) and deadlines.

    /usr/bin/python3 tests/rpc/test_generation.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
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


# ---- the shared tiny-model server -------------------------------------------------------
class TinyServerCase(unittest.TestCase):
    srv = None
    env = None

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--ctx", "512", "--threads", "1", env=cls.env).start()
        cls.c = cls.srv.client()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()


class T1_Generation(TinyServerCase):
    # Step's wait is capped at 10 minutes, not 10 s: a Step that waits when it should not cannot pass
    env = dict(os.environ, KVSERVE_MAX_WAIT_MS="600000")

    def test_submit_step_delivers_indexed_tokens_then_completion(self):
        ids = rand_ids(10, 1)
        req = greq(ids=ids, max_tokens=20, ignore_eos=True)
        id_, toks, comp = self.c.run_submit(req)
        self.assertEqual([t.index for t in toks], list(range(20)))
        self.assertTrue(all(t.id == id_ for t in toks))
        self.assertEqual(comp.id, id_)
        self.assertEqual(list(comp.token_ids), [t.token for t in toks])
        self.assertEqual(comp.text, "".join(t.text for t in toks))
        self.assertEqual(comp.finish_reason, pb.LENGTH)
        self.assertEqual(comp.usage.prompt_tokens, 10)
        self.assertEqual(comp.usage.cached_tokens, 0)
        self.assertEqual(comp.usage.generated_tokens, 20)
        self.assertEqual(comp.error, "")
        # a delivered completion is forgotten
        code, _ = code_of(lambda: self.c.step([id_]))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)

    def test_step_with_wait_zero_returns_at_once(self):
        # held at 0 tokens, the request has no news for as long as the test likes: a Step that waited
        # for news (or for its 10-minute cap) would run into the call's deadline
        self.srv.hold(0)
        try:
            id_ = self.c.submit(greq(ids=rand_ids(5, 2), max_tokens=8, ignore_eos=True))
            fut = self.c._step.future(pb.StepRequest(ids=[id_], wait_ms=0), timeout=None)  # no deadline to meet
            try:
                rep = fut.result(timeout=BOUND)
            except grpc.FutureTimeoutError:
                fut.cancel()
                self.fail(f"Step(wait_ms=0) on a request with no news did not return within {BOUND}s: it waited")
            self.assertEqual((len(rep.tokens), len(rep.completions)), (0, 0))
        finally:
            self.srv.release()
        _, toks, comp = self._collect(id_)
        self.assertEqual([t.index for t in toks], list(range(8)))
        self.assertEqual(comp.usage.generated_tokens, 8)

    def _collect(self, id_, limit=BOUND):
        toks, until = [], time.monotonic() + limit
        while time.monotonic() < until:
            rep = self.c.step([id_], wait_ms=1000)
            toks += list(rep.tokens)
            if rep.completions:
                return id_, toks, rep.completions[0]
        self.fail("no completion")

    def test_stream_matches_submit_step_for_the_same_greedy_request(self):
        req = greq(prompt="The quick brown fox", max_tokens=24, ignore_eos=True, add_special_tokens=True)
        toks, comps = self.c.run_stream(req)
        self.assertEqual(len(comps), 1, "exactly one completion, last")
        comp = comps[0]
        self.assertEqual([t.index for t in toks], list(range(24)))
        self.assertTrue(all(t.id == comp.id for t in toks))
        self.assertEqual(list(comp.token_ids), [t.token for t in toks])
        self.assertEqual(comp.text, "".join(t.text for t in toks))
        self.assertEqual(comp.finish_reason, pb.LENGTH)
        self.assertEqual(comp.usage.generated_tokens, 24)
        _, toks2, comp2 = self.c.run_submit(req)
        self.assertEqual(list(comp2.token_ids), list(comp.token_ids))
        self.assertEqual(comp2.text, comp.text)
        self.assertEqual([t.text for t in toks2], [t.text for t in toks])
        self.assertEqual(comp2.usage.prompt_tokens, comp.usage.prompt_tokens)
        self.assertEqual(comp2.usage.generated_tokens, comp.usage.generated_tokens)

    def test_stream_stops_at_a_stop_string_and_omits_it(self):
        base = greq(ids=rand_ids(8, 4), max_tokens=40, ignore_eos=True)
        _, comps = self.c.run_stream(base)
        text = comps[0].text
        # a stop string from the middle of the greedy output
        cut = next((i for i in range(len(text) // 3, len(text) - 2) if all(32 < ord(ch) < 127 for ch in text[i:i + 2])), None)
        if cut is None:
            self.skipTest("no usable stop string in the output")
        stop = text[cut:cut + 2]
        req = greq(ids=rand_ids(8, 4), max_tokens=40, ignore_eos=True, stop=[stop])
        toks, comps = self.c.run_stream(req)
        c = comps[0]
        self.assertEqual(c.finish_reason, pb.STOP)
        self.assertEqual(c.text, text[:text.index(stop)])
        self.assertEqual("".join(t.text for t in toks), c.text)

    def test_stream_id_is_not_steppable(self):
        it = self.c.stream(greq(ids=rand_ids(5, 5), max_tokens=30, ignore_eos=True), timeout=BOUND)
        first = next(iter(it))
        sid = first.token.id
        code, _ = code_of(lambda: self.c.step([sid]))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        for _ in it:
            pass

    def test_cancel_of_an_unknown_id_is_not_found(self):
        code, details = code_of(lambda: self.c.cancel(987654321))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("987654321", details)

    def test_concurrent_streams_each_match_their_solo_run(self):
        reqs = [greq(prompt=f"Request {i}: tell me about item {i * 7}", max_tokens=24, ignore_eos=True,
                     sampling=dict(temperature=0.9, top_k=40, top_p=0.95, seed=1000 + i)) for i in range(32)]
        solo = []
        for r in reqs:
            toks, comps = self.c.run_stream(r)
            solo.append((list(comps[0].token_ids), comps[0].text))
        self.assertGreater(len(set(tuple(s[0]) for s in solo)), 16, "prompts/seeds should give different outputs")
        got = [None] * 32
        barrier = threading.Barrier(32)

        def run(i):
            try:
                barrier.wait(BOUND)
                toks, comps = self.c.run_stream(reqs[i])
                got[i] = (list(comps[0].token_ids), comps[0].text, [t.index for t in toks],
                          list(c.finish_reason for c in comps))
            except Exception as e:  # noqa: BLE001 - reported below
                got[i] = e

        ths = [threading.Thread(target=run, args=(i,)) for i in range(32)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(BOUND)
        for i in range(32):
            self.assertNotIsInstance(got[i], Exception, f"stream {i}: {got[i]!r}")
            self.assertIsNotNone(got[i], f"stream {i} did not finish")
            ids, text, idx, fins = got[i]
            self.assertEqual(fins, [pb.LENGTH])
            self.assertEqual(idx, list(range(24)))
            self.assertEqual(ids, solo[i][0], f"stream {i}: concurrent tokens differ from the solo run")
            self.assertEqual(text, solo[i][1])
        self.c.wait_idle(agents_blocks=self._agent_blocks())

    def _agent_blocks(self):
        return sum(a.blocks for a in self.c.list_agents())


class T1b_StepRepeatedIds(TinyServerCase):
    """On a server of its own: a repeated id has made step_reply() use freed memory."""

    def test_step_with_a_repeated_id_reports_each_event_once(self):
        id_ = self.c.submit(greq(ids=rand_ids(6, 3), max_tokens=12, ignore_eos=True))
        toks, comps, until = [], [], time.monotonic() + BOUND
        while not comps and time.monotonic() < until:
            try:
                rep = self.c.step([id_, id_], wait_ms=1000)
            except grpc.RpcError as e:  # refusing duplicates is fine too
                self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT, e.details())
                return
            toks += list(rep.tokens)
            comps += list(rep.completions)
        self.assertEqual([t.index for t in toks], list(range(12)),
                         "Step(ids=[x, x]) must report each token event once")
        self.assertEqual(len(comps), 1, "Step(ids=[x, x]) must report the completion once")


class T2_BadRequests(TinyServerCase):
    def assert_invalid(self, req, field, code=grpc.StatusCode.INVALID_ARGUMENT):
        for name, call in (("Submit", lambda: self.c.submit(req)),
                           ("Stream", lambda: list(self.c.stream(req, timeout=BOUND)))):
            got, details = code_of(call)
            self.assertEqual(got, code, f"{name}: {details}")
            self.assertIn(field, details, f"{name}: the message should name {field!r}")

    def test_empty_prompt_is_invalid(self):
        self.assert_invalid(greq(max_tokens=4), "prompt")

    def test_max_tokens_zero_is_invalid(self):
        self.assert_invalid(greq(prompt="hi", max_tokens=0), "max_tokens")
        self.assert_invalid(greq(prompt="hi", max_tokens=-3), "max_tokens")

    def test_prompt_longer_than_ctx_is_invalid(self):
        self.assert_invalid(greq(ids=rand_ids(600, 6), max_tokens=1), "prompt")
        self.assert_invalid(greq(ids=rand_ids(500, 6), max_tokens=100), "max_tokens")

    def test_prompt_id_outside_the_vocabulary_is_invalid(self):
        self.assert_invalid(greq(ids=[5, 6, 5000], max_tokens=2), "prompt")
        self.assert_invalid(greq(ids=[5, -1], max_tokens=2), "prompt")

    def test_top_p_2_is_invalid(self):
        self.assert_invalid(greq(prompt="hi", max_tokens=2, sampling=dict(top_p=2)), "top_p")

    def test_temperature_negative_is_invalid(self):
        self.assert_invalid(greq(prompt="hi", max_tokens=2, sampling=dict(temperature=-1)), "temperature")

    def test_other_sampling_out_of_range_is_invalid(self):
        self.assert_invalid(greq(prompt="hi", max_tokens=2, sampling=dict(top_k=-1)), "top_k")
        self.assert_invalid(greq(prompt="hi", max_tokens=2, sampling=dict(min_p=1.5)), "min_p")
        self.assert_invalid(greq(prompt="hi", max_tokens=2, sampling=dict(repeat_penalty=-2)), "repeat_penalty")

    def test_too_many_stop_strings_are_invalid(self):
        self.assert_invalid(greq(prompt="hi", max_tokens=2, stop=[f"s{i}" for i in range(17)]), "stop")

    def test_reset_without_agent_id_is_invalid(self):
        self.assert_invalid(greq(prompt="hi", max_tokens=2, reset=True), "agent_id")

    def test_step_without_ids_is_invalid(self):
        code, details = code_of(lambda: self.c.step([]))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("ids", details)

    def test_step_of_an_unknown_id_is_not_found(self):
        code, details = code_of(lambda: self.c.step([424242], wait_ms=100))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("424242", details)

    def test_unknown_method_is_unimplemented(self):
        for path in ("/kvserve.v1.Generation/Nope", "/no.such.Service/Call"):
            call = unary(self.srv.channel(), path, pb.StatsRequest, pb.StatsReply)
            code, details = code_of(lambda: call(pb.StatsRequest(), timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED, details)

    def test_agent_calls_without_agent_id_are_invalid(self):
        for name, call in (("GetAgent", lambda: self.c.get_agent("")),
                           ("DropAgent", lambda: self.c.drop_agent("")),
                           ("ExportAgent", lambda: self.c.export_agent("")),
                           ("ImportAgent", lambda: self.c.import_agent("", b"x"))):
            code, details = code_of(call)
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {details}")
            self.assertIn("agent_id", details, name)

    def test_unknown_agent_is_not_found(self):
        for name, call in (("GetAgent", lambda: self.c.get_agent("nobody")),
                           ("DropAgent", lambda: self.c.drop_agent("nobody")),
                           ("ExportAgent", lambda: self.c.export_agent("nobody"))):
            code, details = code_of(call)
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, f"{name}: {details}")

    def test_malformed_request_bytes_are_invalid(self):
        raw = self.srv.channel().unary_unary("/kvserve.v1.Generation/Submit")  # bytes in, bytes out
        code, details = code_of(lambda: raw(b"\x0a\xff\xff\xff", timeout=BOUND))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)


class T3_Agents(TinyServerCase):
    P, Q = rand_ids(10, 7), rand_ids(5, 8)

    def turn(self, agent, ids, n, **kw):
        toks, comps = self.c.run_stream(greq(ids=ids, max_tokens=n, ignore_eos=True, agent_id=agent, **kw))
        self.assertEqual(len(comps), 1)
        self.assertEqual(comps[0].finish_reason, pb.LENGTH, comps[0].error)
        return comps[0]

    def test_second_turn_reuses_the_first_turns_kv(self):
        c1 = self.turn("two-turns", self.P, 8)
        self.assertEqual((c1.usage.prompt_tokens, c1.usage.cached_tokens, c1.usage.generated_tokens), (10, 0, 8))
        info = self.c.get_agent("two-turns")
        self.assertEqual(info.agent_id, "two-turns")
        self.assertEqual(info.tokens, 18)
        self.assertEqual(info.cached_tokens, 17)
        self.assertFalse(info.busy)
        c2 = self.turn("two-turns", self.Q, 6)
        self.assertEqual(c2.usage.prompt_tokens, 18 + 5, "agent history + new prompt")
        self.assertEqual(c2.usage.cached_tokens, 10 + 8 - 1, "first turn's prompt + generated - 1")
        self.assertEqual(c2.usage.generated_tokens, 6)
        self.assertEqual(self.c.get_agent("two-turns").tokens, 18 + 5 + 6)
        # reset forgets the history
        c3 = self.turn("two-turns", self.P, 8, reset=True)
        self.assertEqual(c3.usage.prompt_tokens, 10)
        self.assertEqual(list(c3.token_ids), list(c1.token_ids))

    def test_export_drop_import_continues_like_an_unexported_twin(self):
        ca, cb = self.turn("twin-a", self.P, 8), self.turn("twin-b", self.P, 8)
        self.assertEqual(list(ca.token_ids), list(cb.token_ids))
        data = self.c.export_agent("twin-a")
        self.assertTrue(data.startswith(b"KVSAGENT"), data[:16])
        self.c.drop_agent("twin-a")
        code, _ = code_of(lambda: self.c.get_agent("twin-a"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        info = self.c.import_agent("twin-a", data)
        self.assertEqual((info.agent_id, info.tokens), ("twin-a", 18))
        code, _ = code_of(lambda: self.c.import_agent("twin-a", data))
        self.assertEqual(code, grpc.StatusCode.ALREADY_EXISTS)
        names = [a.agent_id for a in self.c.list_agents()]
        self.assertIn("twin-a", names)
        self.assertIn("twin-b", names)
        sampling = dict(temperature=0.8, seed=77)
        a2 = self.turn("twin-a", self.Q, 12, sampling=sampling)
        b2 = self.turn("twin-b", self.Q, 12, sampling=sampling)
        self.assertEqual(list(a2.token_ids), list(b2.token_ids))
        self.assertEqual(a2.text, b2.text)
        self.assertEqual(a2.usage.prompt_tokens, b2.usage.prompt_tokens)
        self.assertEqual(a2.usage.cached_tokens, 17, "the imported KV is reused")
        # a copy under another name works too
        self.c.import_agent("twin-c", data)
        c2 = self.turn("twin-c", self.Q, 12, sampling=sampling)
        self.assertEqual(list(c2.token_ids), list(b2.token_ids))

    def test_import_of_corrupt_data_is_invalid(self):
        self.turn("to-corrupt", self.P, 4)
        data = bytearray(self.c.export_agent("to-corrupt"))
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x5A
        for name, bad in (("flipped byte", bytes(flipped)), ("truncated", bytes(data[:len(data) - 7])),
                          ("garbage", b"not an agent at all"), ("empty", b"")):
            code, details = code_of(lambda: self.c.import_agent("corrupt-" + name.replace(" ", "-"), bad))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {details}")
            self.assertIn("data", details, name)
        names = [a.agent_id for a in self.c.list_agents()]
        self.assertFalse([n for n in names if n.startswith("corrupt-")], "a refused import leaves no agent")


# ---- limits -----------------------------------------------------------------------------------
class T4_PoolLimit(unittest.TestCase):
    def test_request_beyond_the_pool_is_resource_exhausted(self):
        srv = Server("--pool-blocks", "4", "--block-tokens", "16", "--threads", "1").start()
        try:
            c = srv.client()
            req = greq(ids=rand_ids(5, 9), max_tokens=100, ignore_eos=True)  # 7 blocks > 4
            for name, call in (("Submit", lambda: c.submit(req)), ("Stream", lambda: list(c.stream(req)))):
                code, details = code_of(call)
                self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{name}: {details}")
                self.assertIn("pool", details)
            toks, comps = c.run_stream(greq(ids=rand_ids(5, 9), max_tokens=40, ignore_eos=True))
            self.assertEqual(comps[0].finish_reason, pb.LENGTH)
            # an agent whose history outgrows the pool: the turn ends with finish ERROR and a reason
            c.run_stream(greq(ids=rand_ids(5, 10), max_tokens=30, ignore_eos=True, agent_id="big"))
            toks, comps = c.run_stream(greq(ids=rand_ids(5, 11), max_tokens=30, ignore_eos=True, agent_id="big"))
            self.assertEqual(comps[0].finish_reason, pb.ERROR)
            self.assertIn("pool", comps[0].error)
        finally:
            srv.stop()


# ---- cancellation and deadlines (need a generation that lasts) ---------------------------------
class T5_CancelAndDeadline(unittest.TestCase):
    """A generation still running when the client acts: held by the test hook, whatever the machine's speed.
    One running slot (--max-running 1), so a second request waits in the queue."""
    srv = None

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--threads", "1", "--max-running", "1").start()
        cls.c = cls.srv.client()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def tearDown(self):
        self.srv.release()
        self.c.wait_idle(agents_blocks=sum(a.blocks for a in self.c.list_agents()))

    LONG = dict(max_tokens=400, ignore_eos=True)

    def first_tokens(self, call, n):
        """The first n events of a stream (tokens): the request is running, held at n."""
        it = iter(call)
        evs = [next(it) for _ in range(n)]
        self.assertTrue(all(ev.WhichOneof("event") == "token" for ev in evs), evs)
        return it

    def test_client_cancel_mid_stream_frees_the_blocks(self):
        self.srv.hold(3)
        call = self.c.stream(greq(prompt="Once upon a time", **self.LONG))
        self.first_tokens(call, 3)
        st = self.c.stats()
        self.assertEqual(st.running, 1, "the held generation should be running")
        self.assertLess(st.blocks_free, st.blocks_total)
        call.cancel()
        self.c.wait_idle()

    def test_cancel_rpc_ends_a_submitted_request_as_cancelled(self):
        self.srv.hold(1)
        id_ = self.c.submit(greq(prompt="Once upon a time", **self.LONG))
        toks = []
        wait_for(lambda: toks.extend(self.c.step([id_], wait_ms=1000).tokens) or toks, "a first token")
        self.assertEqual([t.index for t in toks], [0])
        self.c.cancel(id_)
        _, more, comp = self._tail(id_)
        self.assertEqual(more, [], "no token after the one the hold allows")
        self.assertEqual(comp.finish_reason, pb.CANCELLED)
        self.assertEqual(comp.usage.generated_tokens, 1)
        code, _ = code_of(lambda: self.c.cancel(id_))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND, "cancel of a finished, collected request")

    def _tail(self, id_, limit=BOUND):
        toks, until = [], time.monotonic() + limit
        while time.monotonic() < until:
            rep = self.c.step([id_], wait_ms=1000)
            toks += list(rep.tokens)
            if rep.completions:
                return id_, toks, rep.completions[0]
        self.fail(f"no completion for {id_} within {limit}s")

    def test_stream_deadline_exceeded_frees_the_blocks(self):
        self.srv.hold(1)  # it cannot finish before its deadline, however fast the machine
        call = self.c.stream(greq(prompt="A long story", **self.LONG), timeout=1.0)
        n = 0
        with self.assertRaises(grpc.RpcError) as cm:
            for _ in call:
                n += 1
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLessEqual(n, 1)
        self.c.wait_idle()

    def test_client_cancel_of_a_queued_stream(self):
        self.srv.hold(1)
        running = self.c.stream(greq(prompt="Running", **self.LONG))
        self.first_tokens(running, 1)
        queued = self.c.stream(greq(prompt="Queued", **self.LONG))
        self.c.wait_stats("the second stream waiting behind the first", lambda st: st.waiting == 1)
        queued.cancel()
        st = self.c.wait_stats("the cancelled stream gone from the queue", lambda st: st.waiting == 0)
        self.assertEqual(st.running, 1)
        running.cancel()
        self.c.wait_idle()

    def test_busy_agent_cannot_be_dropped_or_exported(self):
        self.srv.hold(3)
        call = self.c.stream(greq(prompt="Agent at work", agent_id="busy-agent", **self.LONG))
        self.first_tokens(call, 3)
        self.assertTrue(self.c.get_agent("busy-agent").busy)
        for name, fn in (("DropAgent", lambda: self.c.drop_agent("busy-agent")),
                         ("ExportAgent", lambda: self.c.export_agent("busy-agent"))):
            code, details = code_of(fn)
            self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION, f"{name}: {details}")
        call.cancel()
        info = wait_for(lambda: (lambda i: None if i.busy else i)(self.c.get_agent("busy-agent")),
                        "the agent idle again after its stream was cancelled")
        self.assertGreaterEqual(info.tokens, 3 + 3, "the agent keeps its prompt and what was generated")
        self.c.drop_agent("busy-agent")

    def test_step_events_survive_a_step_whose_deadline_expired(self):
        # the only running slot is taken by a held stream, so B waits in the queue
        self.srv.hold(1)
        blocker = self.c.stream(greq(prompt="Blocking", **self.LONG))
        self.first_tokens(blocker, 1)
        b = self.c.submit(greq(prompt="Short one", max_tokens=3, ignore_eos=True))
        self.c.wait_stats("B waiting behind the blocker", lambda st: st.waiting == 1)
        # the server answers a parked Step just before the client's deadline
        # (an empty reply) or the client times out; either way nothing is lost
        try:
            rep = self.c.step([b], wait_ms=8000, timeout=0.5)
            self.assertEqual((len(rep.tokens), len(rep.completions)), (0, 0))
        except grpc.RpcError as e:
            self.assertEqual(e.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        blocker.cancel()  # B runs now, while the abandoned Step may still be parked server-side
        self.srv.release()
        self.c.wait_stats("B finished, its events buffered for a Step",
                          lambda st: st.running == 0 and st.waiting == 0)
        toks, comp, until = [], None, time.monotonic() + BOUND
        while comp is None and time.monotonic() < until:
            try:
                rep = self.c.step([b], wait_ms=1000)
            except grpc.RpcError as e:
                self.fail(f"Step after an abandoned Step: {e.code()} {e.details()} "
                          f"(the request's events were handed to the Step whose client had gone)")
            toks += list(rep.tokens)
            comp = rep.completions[0] if rep.completions else None
        self.assertEqual([t.index for t in toks], [0, 1, 2], "token events lost to the abandoned Step")
        self.assertIsNotNone(comp)


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-generation"))
