#!/usr/bin/python3
"""kvserve over gRPC, from Python (Debian's python3-grpcio), against real servers:
generation, errors, agents, limits, cancellation and deadlines, auth, TLS,
start-up errors, shutdown, the prompt and RAG caches, metrics, single-flight,
the batcher, BLAS kernels and precision flags.

    /usr/bin/python3 tests/rpc/test_rpc.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [-k PATTERN] [-v]

The harness (servers, clients, Redis, the hold hook, bounded waits) is
tests/rpc/harness.py; nothing here depends on the machine's speed.
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


# ---- authentication ---------------------------------------------------------------------------
class T6_Auth(unittest.TestCase):
    def test_bearer_tokens_and_tenant_isolation(self):
        tokfile = os.path.join(TMP, "tokens")
        with open(tokfile, "w") as f:
            f.write("# tenants\ntok-alice-123 alice\ntok-bob-456 bob\n")
        srv = Server("--token-file", tokfile, "--threads", "1").start()
        try:
            anon, wrong = srv.client(), srv.client("tok-mallory")
            alice, bob = srv.client("tok-alice-123"), srv.client("tok-bob-456")
            basic = Client(srv.channel(), None)
            basic.md = [("authorization", "Basic dG9rLWFsaWNlLTEyMw==")]
            for who, cl in (("no token", anon), ("wrong token", wrong), ("Basic scheme", basic)):
                for name, call in (("Stats", cl.stats), ("Submit", lambda: cl.submit(greq(prompt="hi"))),
                                   ("Stream", lambda: list(cl.stream(greq(prompt="hi")))),
                                   ("ListAgents", cl.list_agents)):
                    code, details = code_of(call)
                    self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED, f"{who} {name}: {details}")
            self.assertEqual(anon.health(), SERVING, "health needs no token")
            # alice's agent and requests are hers alone
            P = rand_ids(8, 12)
            _, ca = alice.run_stream(greq(ids=P, max_tokens=6, ignore_eos=True, agent_id="secret"))
            self.assertEqual(alice.get_agent("secret").tokens, 14)
            for name, call in (("GetAgent", lambda: bob.get_agent("secret")),
                               ("DropAgent", lambda: bob.drop_agent("secret")),
                               ("ExportAgent", lambda: bob.export_agent("secret"))):
                code, details = code_of(call)
                self.assertEqual(code, grpc.StatusCode.NOT_FOUND, f"bob {name}: {details}")
            self.assertEqual([a.agent_id for a in bob.list_agents()], [])
            # bob may have his own agent of the same name, independent of alice's
            _, cb = bob.run_stream(greq(ids=rand_ids(3, 13), max_tokens=2, ignore_eos=True, agent_id="secret"))
            self.assertEqual(bob.get_agent("secret").tokens, 5)
            self.assertEqual(alice.get_agent("secret").tokens, 14)
            bob.run_stream(greq(ids=rand_ids(3, 14), max_tokens=2, ignore_eos=True, agent_id="bobs-own"))
            self.assertEqual(sorted(a.agent_id for a in alice.list_agents()), ["secret"])
            self.assertEqual(sorted(a.agent_id for a in bob.list_agents()), ["bobs-own", "secret"])
            # an export is signed for its tenant: bob cannot import alice's, and nothing is created
            data = alice.export_agent("secret")
            code, details = code_of(lambda: bob.import_agent("from-alice", data))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertIn("data", details)
            for who in (alice, bob):
                code, _ = code_of(lambda: who.get_agent("from-alice"))
                self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
            alice.import_agent("alice-copy", data)  # her own, under another name: fine
            self.assertEqual(alice.get_agent("alice-copy").tokens, 14)
            # request ids: bob can neither step nor cancel alice's
            rid = alice.submit(greq(ids=P, max_tokens=5, ignore_eos=True))
            for name, call in (("Step", lambda: bob.step([rid], wait_ms=100)), ("Cancel", lambda: bob.cancel(rid))):
                code, details = code_of(call)
                self.assertEqual(code, grpc.StatusCode.NOT_FOUND, f"bob {name} of alice's request: {details}")
            toks, comp = self._collect(alice, rid)
            self.assertEqual(comp.finish_reason, pb.LENGTH, "bob's Cancel must not have touched it")
            self.assertEqual(len(toks), 5)
            alice.drop_agent("secret")
            self.assertEqual(bob.get_agent("secret").tokens, 5, "alice's drop leaves bob's agent")
        finally:
            srv.stop()

    @staticmethod
    def _collect(cl, rid, limit=BOUND):
        toks, until = [], time.monotonic() + limit
        while time.monotonic() < until:
            rep = cl.step([rid], wait_ms=1000)
            toks += list(rep.tokens)
            if rep.completions:
                return toks, rep.completions[0]
        raise AssertionError("no completion")

    def test_bad_token_file_is_refused_at_start(self):
        bad = os.path.join(TMP, "tokens-bad")
        with open(bad, "w") as f:
            f.write("only-a-token\n")
        for name, path in (("missing file", os.path.join(TMP, "no-such-tokens")), ("malformed line", bad)):
            rc, err, dt = run_failing(["--token-file", path])
            self.assertNotEqual(rc, 0, name)
            self.assertIn("token file", err, name)


# ---- TLS, mTLS and start-up errors -------------------------------------------------------------
def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=BOUND, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def make_pki(d):
    os.makedirs(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kvserve-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, cn, ext in (("srv", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                               "extendedKeyUsage=serverAuth\n"),
                          ("cli", "kvserve-test-client", "extendedKeyUsage=clientAuth\n")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\n" + ext)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    # a second, unrelated CA and a client certificate from it
    openssl("req", "-x509", *ec, "-keyout", "ca2.key", "-out", "ca2.pem", "-days", "2", "-subj", "/CN=other-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", cwd=d)
    openssl("req", *ec, "-keyout", "rogue.key", "-out", "rogue.csr", "-subj", "/CN=rogue", cwd=d)
    openssl("x509", "-req", "-in", "rogue.csr", "-CA", "ca2.pem", "-CAkey", "ca2.key", "-CAcreateserial",
            "-out", "rogue.pem", "-days", "2", "-extfile", "cli.ext", cwd=d)
    with open(os.path.join(d, "garbage.pem"), "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return {n: os.path.join(d, n) for n in os.listdir(d)}


def read(path):
    with open(path, "rb") as f:
        return f.read()


class T7_TlsAndStartup(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pki = make_pki(os.path.join(TMP, "pki"))

    def creds(self, client_cert=False, ca="ca.pem", cert="cli"):
        k = self.pki
        if client_cert:
            return grpc.ssl_channel_credentials(read(k[ca]), read(k[f"{cert}.key"]), read(k[f"{cert}.pem"]))
        return grpc.ssl_channel_credentials(read(k[ca]))

    def test_tls_server_accepts_verified_channels_and_refuses_plaintext(self):
        k = self.pki
        srv = Server("--tls-cert", k["srv.pem"], "--tls-key", k["srv.key"], "--threads", "1",
                     creds=self.creds()).start()
        try:
            c = srv.client()
            self.assertGreater(c.stats().blocks_total, 0)
            toks, comps = c.run_stream(greq(prompt="over TLS", max_tokens=5, ignore_eos=True))
            self.assertEqual(len(toks), 5)
            code, _ = code_of(lambda: srv.client(creds=None).stats(timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, "plaintext client against TLS")
            code, _ = code_of(lambda: srv.client(creds=self.creds(ca="ca2.pem")).stats(timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, "client that does not trust the server's CA")
            # 'localhost' is in the certificate too
            Client(grpc.secure_channel(f"localhost:{srv.port}", self.creds(), FAST_RECONNECT)).stats(timeout=BOUND)
        finally:
            srv.stop()

    def test_mtls_server_requires_a_client_certificate_from_its_ca(self):
        k = self.pki
        srv = Server("--tls-cert", k["srv.pem"], "--tls-key", k["srv.key"], "--tls-client-ca", k["ca.pem"],
                     "--threads", "1", creds=self.creds(client_cert=True)).start()
        try:
            self.assertGreater(srv.client().stats().blocks_total, 0)
            code, _ = code_of(lambda: srv.client(creds=self.creds()).stats(timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, "no client certificate")
            code, _ = code_of(lambda: srv.client(creds=self.creds(client_cert=True, cert="rogue")).stats(timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, "client certificate from another CA")
            code, _ = code_of(lambda: srv.client(creds=None).stats(timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, "plaintext")
        finally:
            srv.stop()

    def assert_start_fails(self, args, expect, model=None, one_line=True):
        """A non-zero exit (not a server that keeps running); one "kvserve: ..." line naming `expect`
        (and, with one_line, nothing else but the server's own timestamped log lines)."""
        rc, err, dt = run_failing(args, model=model)
        self.assertNotEqual(rc, 0, f"{args}: exit code 0")
        self.assertGreater(rc, 0, f"{args}: killed by signal {-rc}:\n{err}")
        lines = error_lines(err)
        ours = [l for l in lines if l.startswith("kvserve: ")]
        self.assertEqual(len(ours), 1, f"{args}: one 'kvserve: ' error line expected, got:\n{err}")
        if one_line:
            self.assertEqual(lines, ours, f"{args}: nothing but the one error line expected, got:\n{err}")
        self.assertIn(expect, ours[0], f"{args}: the message should name {expect!r}")
        return ours[0]

    def test_bad_pem_files_fail_at_start_with_one_line(self):
        k, nope = self.pki, os.path.join(TMP, "no-such.pem")
        self.assert_start_fails(["--tls-cert", nope, "--tls-key", k["srv.key"]], nope)
        self.assert_start_fails(["--tls-cert", k["srv.pem"], "--tls-key", nope], nope)
        self.assert_start_fails(["--tls-cert", k["garbage.pem"], "--tls-key", k["srv.key"]], "--tls-cert")
        self.assert_start_fails(["--tls-cert", k["srv.pem"], "--tls-key", k["garbage.pem"]], "--tls-key")
        self.assert_start_fails(["--tls-cert", k["srv.pem"], "--tls-key", k["srv.pem"]], "--tls-key")
        self.assert_start_fails(["--tls-cert", k["srv.pem"], "--tls-key", k["srv.key"],
                                 "--tls-client-ca", k["garbage.pem"]], "--tls-client-ca")
        self.assert_start_fails(["--tls-cert", k["srv.pem"]], "--tls-key")

    def test_key_that_does_not_match_the_certificate_fails_at_start(self):
        k = self.pki
        line = self.assert_start_fails(["--tls-cert", k["srv.pem"], "--tls-key", k["cli.key"]], "--tls-key",
                                       one_line=False)
        self.assertNotIn("address in use", line, "a key/certificate mismatch is not a listening problem")

    def test_port_in_use_fails_with_a_clear_message(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        try:
            line = self.assert_start_fails(["--listen", f"127.0.0.1:{port}"], f"127.0.0.1:{port}", one_line=False)
            self.assertIn("in use", line)
        finally:
            s.close()

    def test_port_held_by_another_kvserve_fails(self):
        srv = Server("--threads", "1").start()
        try:
            rc, err, dt = run_failing(["--listen", f"127.0.0.1:{srv.port}", "--threads", "1"])
        except AssertionError as e:
            raise AssertionError(f"{e}: a second kvserve started on port {srv.port}, which the first one holds "
                                 "(SO_REUSEPORT: the two now share the port's connections)") from None
        finally:
            srv.stop()  # (subprocess.run killed the second one at its timeout)
        self.assertNotEqual(rc, 0)
        self.assertIn(str(srv.port), err)

    def test_bad_model_dir_fails_with_a_message(self):
        nope = os.path.join(TMP, "no-model-here")
        self.assert_start_fails([], nope, model=nope)
        empty = os.path.join(TMP, "empty-model")
        os.makedirs(empty, exist_ok=True)
        self.assert_start_fails([], "config.json", model=empty)


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
            srv.stop()
        finally:
            srv.kill()
            redis.stop()


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
    sys.exit(harness.run(__name__, "rpc-python"))
