#!/usr/bin/python3
"""Agents' warm tier (--agent-save-after): an agent's KV goes to a real Redis when the pool evicts
it, when it has been idle, and at shutdown; a turn naming an agent that holds no KV here brings it
back from Redis, on this replica or another one, and goes on exactly as if it had never left.
Redis down, an export signed with another key, a dropped agent: recomputed or new, never a failed
request.

    /usr/bin/python3 tests/rpc/test_agent_store.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [-k PATTERN] [-v]

Every wait polls an observable condition (GetAgent's `saved`, `blocks`; /metrics) with a bound.
"""
import os
import sys
import unittest

import harness
from harness import *  # noqa: F401,F403 - Server, Client, Redis, greq, wait_for, BOUND, pb, ...

TURNS = [(rand_ids(40, 1), 8), (rand_ids(7, 2), 8), (rand_ids(9, 3), 8)]


def key_file(name, byte):
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(bytes([byte]) * 32)
    return path


KEY = None


def turn(c, agent, ids, n):
    kw = {"agent_id": agent} if agent else {}
    toks, comps = c.run_stream(greq(ids=ids, max_tokens=n, ignore_eos=True, **kw))
    assert len(comps) == 1 and comps[0].finish_reason == pb.LENGTH, comps
    return [t.token for t in toks], comps[0].usage


_REFERENCE = None


def reference():
    """The tokens of every turn of an agent that never leaves memory (a server without the store)."""
    global _REFERENCE
    if _REFERENCE is None:
        srv = Server("--threads", "1").start()
        try:
            c = srv.client()
            _REFERENCE = [turn(c, "ref", ids, n)[0] for ids, n in TURNS]
        finally:
            srv.stop()
    return _REFERENCE


class AgentStore(unittest.TestCase):
    def setUp(self):
        global KEY
        KEY = KEY or key_file("export-key", 0x5a)
        self.redis = Redis().start()
        self.servers = []

    def tearDown(self):
        try:
            for s in self.servers:
                if s.proc and s.proc.poll() is None:
                    s.stop()
        finally:
            for s in self.servers:
                s.kill()
            self.redis.stop()

    def server(self, *args, after="0", key=None):
        s = Server("--redis", self.redis.url(), "--agent-save-after", after, "--export-key", key or KEY,
                   "--threads", "1", *args).start()
        self.servers.append(s)
        return s

    def wait_saved(self, c, agent):
        return wait_for(lambda: c.get_agent(agent).saved, f"agent {agent} saved to Redis")

    def history(self, n_turns):
        return sum(len(ids) + n for ids, n in TURNS[:n_turns])

    def test_restart_restores_with_identical_output(self):
        """Idle for 0 s: saved after each turn; a new process on the same Redis continues the agent."""
        ref = reference()
        a = self.server()
        c = a.client()
        for i in range(2):
            self.assertEqual(turn(c, "x", *TURNS[i])[0], ref[i])
        self.wait_saved(c, "x")
        a.stop()
        b = self.server()
        toks, usage = turn(b.client(), "x", *TURNS[2])
        self.assertEqual(toks, ref[2], "the third turn after a restore = an agent that never left")
        self.assertEqual(usage.prompt_tokens, self.history(2) + len(TURNS[2][0]))
        self.assertEqual(usage.cached_tokens, self.history(2) - 1, "only the new tokens are prefilled")
        m = scrape_port(b)
        self.assertEqual(m.get('kvserve_agent_store_total{op="restore"}'), 1.0)

    def test_shutdown_saves_what_idle_did_not(self):
        """Idle for an hour: nothing is saved during the test; SIGTERM writes the agent."""
        ref = reference()
        a = self.server(after="3600")
        c = a.client()
        self.assertEqual(turn(c, "s", *TURNS[0])[0], ref[0])
        self.assertFalse(c.get_agent("s").saved)
        a.stop()
        self.assertIn("1 saved to Redis at shutdown", a.log())
        b = self.server(after="3600")
        toks, usage = turn(b.client(), "s", *TURNS[1])
        self.assertEqual(toks, ref[1])
        self.assertEqual(usage.cached_tokens, self.history(1) - 1)

    def test_eviction_spills_and_the_next_turn_restores(self):
        """A pool of 12 blocks: a long request evicts the idle agent, whose KV goes to Redis first."""
        ref = reference()
        a = self.server("--pool-blocks", "12", after="3600")
        c = a.client()
        self.assertEqual(turn(c, "e", *TURNS[0])[0], ref[0])
        self.assertGreater(c.get_agent("e").blocks, 0)
        turn(c, None, rand_ids(150, 9), 8)  # 10 blocks: 9 are free
        info = c.get_agent("e")
        self.assertEqual(info.blocks, 0, "evicted")
        self.wait_saved(c, "e")
        toks, usage = turn(c, "e", *TURNS[1])
        self.assertEqual(toks, ref[1], "after eviction and restore = never evicted")
        self.assertEqual(usage.cached_tokens, self.history(1) - 1, "restored from Redis, not recomputed")

    def test_kill_9_then_another_replica(self):
        """The replica holding the agent dies without a shutdown; another one restores what was saved."""
        ref = reference()
        a, b = self.server(), self.server()
        ca = a.client()
        for i in range(2):
            turn(ca, "k", *TURNS[i])
        self.wait_saved(ca, "k")
        a.kill()
        toks, usage = turn(b.client(), "k", *TURNS[2])
        self.assertEqual(toks, ref[2])
        self.assertEqual(usage.cached_tokens, self.history(2) - 1)

    def test_redis_down_fails_open(self):
        """Without Redis, turns succeed: an evicted agent is recomputed from its tokens, same output."""
        ref = reference()
        a = self.server("--pool-blocks", "12", after="3600")
        c = a.client()
        self.redis.stop()
        self.assertEqual(turn(c, "d", *TURNS[0])[0], ref[0])
        turn(c, None, rand_ids(150, 9), 8)  # evicts "d": the spill fails
        self.assertEqual(c.get_agent("d").blocks, 0)
        toks, usage = turn(c, "d", *TURNS[1])
        self.assertEqual(toks, ref[1], "recomputed from the history")
        self.assertEqual(usage.prompt_tokens, self.history(1) + len(TURNS[1][0]))
        self.assertFalse(c.get_agent("d").saved)
        m = wait_for(lambda: (lambda m: m if m.get('kvserve_agent_store_total{op="error"}', 0) >= 1 else None)(
            scrape_port(a)), "a failed save counted")
        self.assertEqual(m.get('kvserve_agent_store_total{op="save"}'), 0.0)

    def test_drop_forgets_it_in_redis_too(self):
        a = self.server()
        c = a.client()
        turn(c, "gone", *TURNS[0])
        self.wait_saved(c, "gone")
        c.drop_agent("gone")
        a.stop()
        b = self.server()
        cb = b.client()
        code, _ = code_of(lambda: cb.drop_agent("gone"))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        _, usage = turn(cb, "gone", *TURNS[1])
        self.assertEqual(usage.prompt_tokens, len(TURNS[1][0]), "a new agent: nothing came back")

    def test_dropped_while_only_in_redis(self):
        a = self.server()
        c = a.client()
        turn(c, "only-redis", *TURNS[0])
        self.wait_saved(c, "only-redis")
        a.stop()
        b = self.server()
        cb = b.client()
        cb.drop_agent("only-redis")  # not in b's memory: in Redis
        _, usage = turn(cb, "only-redis", *TURNS[1])
        self.assertEqual(usage.prompt_tokens, len(TURNS[1][0]))

    def test_another_key_is_not_restored(self):
        """A replica with another --export-key cannot verify the stored agent: it starts anew."""
        a = self.server()
        c = a.client()
        turn(c, "signed", *TURNS[0])
        self.wait_saved(c, "signed")
        a.stop()
        b = self.server(key=key_file("other-key", 0x33))
        _, usage = turn(b.client(), "signed", *TURNS[1])
        self.assertEqual(usage.prompt_tokens, len(TURNS[1][0]))
        self.assertIn("does not verify", b.log())

    def test_tenants_restore_only_their_own(self):
        """Two tenants, one agent id: each restores its own agent, never the other's."""
        tokfile = os.path.join(TMP, "store-tokens")
        with open(tokfile, "w") as f:
            f.write("tok-a alice\ntok-b bob\n")
        ref = reference()
        a = self.server("--token-file", tokfile)
        turn(a.client("tok-a"), "same", *TURNS[0])
        self.wait_saved(a.client("tok-a"), "same")
        a.stop()
        b = self.server("--token-file", tokfile)
        _, usage = turn(b.client("tok-b"), "same", *TURNS[1])
        self.assertEqual(usage.prompt_tokens, len(TURNS[1][0]), "bob's agent is new: alice's stayed hers")
        toks, usage = turn(b.client("tok-a"), "same", *TURNS[1])
        self.assertEqual((toks, usage.cached_tokens), (ref[1], self.history(1) - 1))

    def test_needs_redis(self):
        rc, err, _ = run_failing(["--agent-save-after", "1"])
        self.assertNotEqual(rc, 0)
        self.assertIn("--redis", err)


def scrape_port(srv):
    return scrape(srv.mport)


_orig_server_init = Server.__init__


def _with_metrics(self, *args, **kw):
    """Every server here also serves /metrics on a port of its own (srv.mport)."""
    _orig_server_init(self, *args, **kw)
    self.mport = free_port()
    self.args += ["--metrics", f"127.0.0.1:{self.mport}"]


Server.__init__ = _with_metrics

if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-agent-store"))
