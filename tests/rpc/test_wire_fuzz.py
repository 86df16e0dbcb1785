#!/usr/bin/python3
"""A wire fuzzer over every method of a real server (run under ASan in the README test command):
random bytes and mutations of valid requests (bit flips, truncations, insertions, splices, broken
lengths) to each unary, server-streaming and bidirectional method, with a fixed seed and a fixed
number of messages (so its length does not depend on the machine). Every call must end with a
gRPC status (never a hang or a dropped connection), the server must stay healthy, keep serving a
known request identically, free every KV block, and exit 0 on SIGTERM without a sanitizer report.

    /usr/bin/python3 tests/rpc/test_wire_fuzz.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [--per-method N] [--seed S]

Part of issue 12's hostile-input suite. Harness: tests/rpc/harness.py.
"""
import argparse
import random
import sys
import unittest

import grpc

import harness
from harness import *  # noqa: F401,F403

_ap = argparse.ArgumentParser(add_help=False)
_ap.add_argument("--per-method", type=int, default=300)
_ap.add_argument("--seed", type=int, default=12)
OPT, harness._REST = _ap.parse_known_args(harness._REST)

G, A, C, H = "/kvserve.v1.Generation/", "/kvserve.v1.Agents/", "/kvserve.v1.Cache/", "/grpc.health.v1.Health/"


def seeds():
    """Valid requests of every method: {path: (kind, [bytes])}."""
    gen = [greq(prompt="hello there", max_tokens=4, ignore_eos=True),
           greq(ids=[5, 6, 7, 8], max_tokens=3, stop=["x", "yz"], sampling=dict(temperature=0.8, top_k=5, seed=3)),
           greq(prompt="scored", max_tokens=3, logprobs=True, top_logprobs=2),
           greq(prompt="agent", max_tokens=2, agent_id="fz", namespace="n",
                cache=pb.CachePolicy(mode=pb.CachePolicy.REFRESH, ttl_seconds=5))]
    gen = [m.SerializeToString() for m in gen]
    emb = dict(namespace="kb", embedding_model="m", top_k=2, embedding=[0.5, 0.5, 0.1])
    return {
        G + "Submit": ("unary", gen),
        G + "Stream": ("stream", gen),
        G + "Step": ("unary", [pb.StepRequest(ids=[1, 2], wait_ms=5).SerializeToString()]),
        G + "Cancel": ("unary", [pb.CancelRequest(id=3).SerializeToString()]),
        G + "Stats": ("unary", [b""]),
        G + "Score": ("unary", [pb.ScoreRequest(text="score this", add_special_tokens=True).SerializeToString(),
                                pb.ScoreRequest(ids=[5, 6, 7]).SerializeToString()]),
        A + "GetAgent": ("unary", [pb.AgentRequest(agent_id="fz").SerializeToString()]),
        A + "ListAgents": ("unary", [b""]),
        A + "DropAgent": ("unary", [pb.AgentRequest(agent_id="nobody").SerializeToString()]),
        A + "ExportAgent": ("unary", [pb.AgentRequest(agent_id="fz").SerializeToString()]),
        A + "ImportAgent": ("unary", [pb.ImportAgentRequest(agent_id="im", data=b"KVSAGENT" + bytes(60))
                                      .SerializeToString()]),
        C + "Invalidate": ("unary", [pb.InvalidateRequest(namespace="n", purge=True).SerializeToString()]),
        C + "Stats": ("unary", [b""]),
        C + "RagStore": ("unary", [pb.RagStoreRequest(query="q", result=b"r", **emb).SerializeToString()]),
        C + "RagLookup": ("unary", [pb.RagLookupRequest(query="q", **emb).SerializeToString()]),
        H + "Check": ("unary", [hpb.HealthCheckRequest(service="").SerializeToString()]),
        H + "Watch": ("watch", [hpb.HealthCheckRequest(service="kvserve.v1.Agents").SerializeToString()]),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ("bidi", [bytes([0x3a, 0x01, 0x2a])]),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ("bidi", [bytes([0x3a, 0x01, 0x2a])]),
        "/kvserve.v1.Nope/Method": ("unary", [b"\x08\x01"]),
    }


def mutate(rng, data, pool):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:                       # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                     # truncate
            del b[rng.randrange(len(b)):]
        elif op == 2:                           # insert random bytes
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:                     # a byte set to an interesting value
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x7f, 0x80, 0xff, 0x0a, 0x12, 0x22, 0x2a])
        elif op == 4:                           # splice with another valid request
            o = rng.choice(pool)
            b = b[:rng.randrange(len(b) + 1)] + o[rng.randrange(len(o) + 1):]
        elif op == 5:                           # a field with a huge or lying length
            b += bytes([rng.choice([0x0a, 0x12, 0x1a, 0x22]), 0xff, 0xff, 0xff, 0xff, 0x0f]) + b"ab"
        else:                                   # repeat a chunk
            if b:
                i = rng.randrange(len(b))
                b[i:i] = b[i:i + rng.randint(1, 16)] * rng.randint(1, 4)
    return bytes(b)


class WireFuzz(unittest.TestCase):
    def test_every_method_survives_random_and_mutated_requests(self):
        redis = Redis().start()
        srv = Server("--redis", redis.url(), "--threads", "1", "--pool-blocks", "64").start()
        try:
            ch = srv.channel()
            c = srv.client()
            ref = greq(ids=rand_ids(12, 77), max_tokens=8, ignore_eos=True, cache=pb.CachePolicy(mode=1))
            _, before = c.run_stream(ref)
            rng = random.Random(OPT.seed)
            table = seeds()
            pool = [d for _, ds in table.values() for d in ds]
            codes = {}
            for path, (kind, valid) in sorted(table.items()):
                for k in range(OPT.per_method):
                    data = bytes(rng.randrange(256) for _ in range(rng.randrange(64))) if k % 5 == 0 \
                        else mutate(rng, rng.choice(valid), pool)
                    code = self.call(ch, kind, path, data)
                    self.assertNotEqual(code, grpc.StatusCode.UNAVAILABLE,
                                        f"{path} {data!r}: the server dropped the call or died:\n{srv.log()[-3000:]}")
                    self.assertNotEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED, f"{path} {data!r}: no answer")
                    codes[code] = codes.get(code, 0) + 1
                self.assertIsNone(srv.proc.poll(), f"the server died on {path}:\n{srv.log()[-3000:]}")
            print(f"    statuses: { {k.name: v for k, v in sorted(codes.items(), key=lambda x: x[0].name)} }")
            self.assertEqual(c.health(), SERVING)
            _, after = c.run_stream(ref)
            self.assertEqual(list(after[0].token_ids), list(before[0].token_ids), "a known request changed")
            c.wait_stats("the fuzzer's requests done", lambda st: st.running == 0 and st.waiting == 0)
            for a in c.list_agents():  # agents the fuzzer made hold blocks: drop them, then all is free
                c.drop_agent(a.agent_id)
            c.wait_idle()
            srv.stop()
        finally:
            srv.kill()
            redis.stop()

    @staticmethod
    def call(ch, kind, path, data):
        try:
            if kind == "unary":
                ch.unary_unary(path)(data, timeout=BOUND)
            elif kind == "stream":
                for _ in ch.unary_stream(path)(data, timeout=BOUND):
                    pass
            elif kind == "watch":
                it = ch.unary_stream(path)(data, timeout=BOUND)
                try:
                    next(it)  # the first status (or an error) is the answer
                finally:
                    it.cancel()
            else:
                for _ in ch.stream_stream(path)(iter([data]), timeout=BOUND):
                    pass
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-wire-fuzz"))
