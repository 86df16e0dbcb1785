#!/usr/bin/python3
"""Scale-out on loopback: three kvserve replicas, one real Redis, and HAProxy (Debian's) as the gRPC
load balancer — HTTP/2 to the backends, health checks on each replica's /healthz (the gRPC health
status over HTTP/1.1), and balancing by a consistent hash of the x-kvserve-agent header that clients
(kvctl among them) send with an agent's requests.

    /usr/bin/python3 tests/rpc/test_scaleout.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [-k PATTERN] [-v]

Checked: every turn of an agent lands on one replica; prompt-cache hits and RAG entries are shared
across replicas; kill -9 of the replica holding an agent mid-conversation → HAProxy takes it out,
the next turn goes to another replica, which restores the agent from Redis (cached_tokens > 0) and
continues exactly as an uninterrupted run; requests of other agents meanwhile all succeed. Every
wait polls an observable condition (HAProxy's stats socket, GetAgent) with a bound.
"""
import os
import socket
import subprocess
import sys
import threading
import time
import unittest

import harness
from harness import *  # noqa: F401,F403 - Server, Client, Redis, greq, wait_for, BOUND, pb, ...

TURNS = [(rand_ids(30, 11), 6), (rand_ids(7, 12), 6), (rand_ids(5, 13), 6)]
CHECK_INTER_MS, FALL = 300, 2


class HAProxy:
    """haproxy -db (foreground) with a generated configuration; its admin socket answers `show stat`."""

    def __init__(self, servers):
        self.port = free_port()
        self.sock = os.path.join(TMP, "haproxy.sock")
        self.cfg = os.path.join(TMP, "haproxy.cfg")
        self.log_path = os.path.join(TMP, "haproxy.log")
        lines = [
            "global",
            f"    stats socket {self.sock} mode 600 level admin",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            "    timeout client 1h",
            "    timeout server 1h",
            "    retries 3",
            "    option redispatch 1",  # a connection refused by a dead replica is retried on another
            "frontend grpc",
            f"    bind 127.0.0.1:{self.port} proto h2",
            "    default_backend kvserve",
            "backend kvserve",
            "    balance hdr(x-kvserve-agent)",  # no header: round robin
            "    hash-type consistent",
            "    option httpchk GET /healthz",
            "    http-check expect status 200",
        ]
        for i, s in enumerate(servers):
            lines.append(f"    server r{i} 127.0.0.1:{s.port} proto h2 check port {s.mport} check-proto h1 "
                         f"inter {CHECK_INTER_MS}ms fall {FALL} rise 1")
        with open(self.cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = None

    def start(self):
        subprocess.run(["haproxy", "-c", "-q", "-f", self.cfg], check=True, timeout=BOUND)
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", self.cfg], stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, "haproxy's stats socket")
        assert self.proc.poll() is None, open(self.log_path).read()
        return self

    def status(self):
        """{server name: status} of the backend, e.g. {"r0": "UP", ...}."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(BOUND)
        s.connect(self.sock)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        s.close()
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        si, pi, st = head.index("svname"), head.index("pxname"), head.index("status")
        out = {}
        for l in lines[1:]:
            f = l.split(",")
            if len(f) > st and f[pi] == "kvserve" and f[si] not in ("BACKEND", "FRONTEND"):
                out[f[si]] = f[st]
        return out

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(BOUND)
        if self.proc:
            self.logf.close()


def key_file():
    path = os.path.join(TMP, "shared-export-key")
    with open(path, "wb") as f:
        f.write(b"k" * 32)
    return path


class ScaleOut(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.redis = Redis().start()
        key = key_file()
        cls.servers = []
        for _ in range(3):
            mport = free_port()
            s = Server("--redis", cls.redis.url(), "--agent-save-after", "0", "--export-key", key, "--threads", "1",
                       "--metrics", f"127.0.0.1:{mport}")
            s.mport = mport
            cls.servers.append(s.start())
        cls.killed = set()
        cls.lb = HAProxy(cls.servers).start()
        wait_for(lambda: set(cls.lb.status().values()) == {"UP"}, "every replica UP in haproxy")
        cls.lb_ch = grpc.insecure_channel(f"127.0.0.1:{cls.lb.port}", FAST_RECONNECT)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.lb_ch.close()
            cls.lb.stop()
            for i, s in enumerate(cls.servers):
                if i not in cls.killed:
                    s.stop()
        finally:
            for s in cls.servers:
                s.kill()
            cls.redis.stop()

    def via_lb(self, agent=None):
        c = Client(self.lb_ch)
        c.md = [("x-kvserve-agent", agent)] if agent else None
        return c

    def turn(self, c, agent, ids, n, **kw):
        toks, comps = c.run_stream(greq(ids=ids, max_tokens=n, ignore_eos=True, agent_id=agent, **kw))
        self.assertEqual(len(comps), 1)
        self.assertEqual(comps[0].finish_reason, pb.LENGTH, comps[0])
        return [t.token for t in toks], comps[0].usage

    def holders(self, agent):
        """Indexes of the live replicas that hold the agent in memory."""
        out = []
        for i, s in enumerate(self.servers):
            if i not in self.killed and agent in [a.agent_id for a in s.client().list_agents()]:
                out.append(i)
        return out

    def test_1_every_turn_of_an_agent_lands_on_one_replica(self):
        agents = [f"affinity-{i}" for i in range(9)]
        for a in agents:
            c = self.via_lb(a)
            for ids, n in TURNS[:2]:
                _, usage = self.turn(c, a, ids, n)
            self.assertEqual(usage.cached_tokens, len(TURNS[0][0]) + TURNS[0][1] - 1, "the second turn found the KV")
        where = {a: self.holders(a) for a in agents}
        for a, h in where.items():
            self.assertEqual(len(h), 1, f"{a} is on replicas {h}")
        self.assertGreater(len({h[0] for h in where.values()}), 1, f"the hash spread agents: {where}")

    def test_2_prompt_cache_and_rag_are_shared(self):
        req = greq(ids=rand_ids(20, 21), max_tokens=6)
        c0, c1 = self.servers[0].client(), self.servers[1].client()
        _, comps = c0.run_stream(req)
        self.assertFalse(comps[0].cached)
        wait_for(lambda: c1.run_stream(req)[1][0].cached, "replica 1 answers from what replica 0 cached")
        vec = [1.0, 0.5, 0.25, 0.125]
        common = dict(namespace="docs", embedding_model="e", top_k=2)
        store = unary(c0.ch, "/kvserve.v1.Cache/RagStore", pb.RagStoreRequest, pb.RagStoreReply)
        look = unary(c1.ch, "/kvserve.v1.Cache/RagLookup", pb.RagLookupRequest, pb.RagLookupReply)
        self.assertTrue(store(pb.RagStoreRequest(query="q", embedding=vec, result=b"doc-7", **common), timeout=BOUND).stored)
        r = look(pb.RagLookupRequest(query="other words", embedding=vec, **common), timeout=BOUND)
        self.assertTrue(r.hit)
        self.assertEqual(r.result, b"doc-7")

    def test_3_kill_9_the_holder_then_the_next_turn_is_restored_elsewhere(self):
        ref_srv = Server("--threads", "1").start()
        try:
            rc = ref_srv.client()
            ref = [self.turn(rc, "ref", ids, n)[0] for ids, n in TURNS]
        finally:
            ref_srv.stop()
        c = self.via_lb("victim")
        for i in range(2):
            self.assertEqual(self.turn(c, "victim", *TURNS[i])[0], ref[i])
        (holder,) = self.holders("victim")
        wait_for(lambda: self.servers[holder].client().get_agent("victim").saved, "victim saved to Redis")
        # other agents' traffic goes on through the kill: none of it may fail
        others = [a for a in (f"bystander-{i}" for i in range(12)) if self._home(a) != holder][:3]
        self.assertTrue(others, "agents homed on the surviving replicas")
        stop, errors, done = threading.Event(), [], [0]

        def traffic():
            k = 0
            while not stop.is_set():
                a = others[k % len(others)]
                try:
                    self.turn(self.via_lb(a), a, rand_ids(4, 100 + k), 2, reset=True)  # (within the context)
                    done[0] += 1
                except Exception as e:  # noqa: BLE001 - any failure is the finding
                    errors.append(f"{a}: {e}")
                k += 1
        t = threading.Thread(target=traffic)
        t.start()
        try:
            wait_for(lambda: done[0] >= 3, "bystander traffic running")
            t_kill = time.monotonic()
            self.servers[holder].kill()
            self.killed.add(holder)
            name = f"r{holder}"
            wait_for(lambda: self.lb.status().get(name, "").startswith("DOWN"), f"haproxy marks {name} DOWN")
            out_after = time.monotonic() - t_kill
            toks, usage = self.turn(c, "victim", *TURNS[2])
            n0 = done[0]
            wait_for(lambda: done[0] >= n0 + 3 or len(errors) > 3, "bystander traffic after the kill")
        finally:
            stop.set()
            t.join(BOUND)
        self.assertEqual(errors, [], "requests of agents on the surviving replicas failed")
        self.assertEqual(toks, ref[2], "the third turn, restored on another replica = an uninterrupted run")
        history = sum(len(ids) + n for ids, n in TURNS[:2])
        self.assertEqual(usage.cached_tokens, history - 1, "restored from Redis, not recomputed")
        (new_holder,) = self.holders("victim")
        self.assertNotEqual(new_holder, holder)
        self.assertEqual(errors, [], "requests of agents on the surviving replicas failed")
        print(f"\n    haproxy took the killed replica out {out_after:.2f}s after kill -9 "
              f"(checks every {CHECK_INTER_MS} ms, {FALL} failures); {done[0]} bystander turns, none failed")

    def test_4_kvctl_sends_the_agent_header(self):
        """kvctl's turns on one agent, through the balancer: all on one replica (round robin would spread them)."""
        kvctl = os.path.join(os.path.dirname(ARGS.kvserve), "kvctl")
        for i in range(4):
            p = subprocess.run([kvctl, "--addr", f"127.0.0.1:{self.lb.port}", "generate", "--agent", "via-kvctl",
                                "-n", "3", "--ignore-eos", "--quiet", "hello"], capture_output=True, timeout=BOUND)
            self.assertEqual(p.returncode, 0, p.stderr.decode())
        self.assertEqual(len(self.holders("via-kvctl")), 1)
        info = [s.client().get_agent("via-kvctl") for i, s in enumerate(self.servers)
                if i not in self.killed and i in self.holders("via-kvctl")][0]
        self.assertGreater(info.tokens, 12)

    def _home(self, agent):
        """The replica an agent's first turn lands on (its turn creates it there)."""
        self.turn(self.via_lb(agent), agent, rand_ids(4, 7), 2)
        (h,) = self.holders(agent)
        return h


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-scaleout"))
