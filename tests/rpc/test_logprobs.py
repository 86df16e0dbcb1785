#!/usr/bin/python3
"""Log-probabilities over gRPC: TokenEvent.logprob and top_logprobs on Stream and Submit/Step, and the
Score RPC, checked against `kvserve score` (the local command line, the single-sequence runtime) on
the same text and against each other; kvctl score; bad values refused naming the field.

    /usr/bin/python3 tests/rpc/test_logprobs.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [-k PATTERN] [-v]
"""
import math
import os
import subprocess
import sys
import unittest

import harness
from harness import *  # noqa: F401,F403 - Server, Client, greq, wait_for, BOUND, pb, ...

TOL = 1e-4  # the batch engine and the single-sequence runtime agree to float rounding (docs/api.md)
KVCTL = os.path.join(os.path.dirname(ARGS.kvserve), "kvctl")


def cli_score(text, bos=False):
    """`kvserve score`: [(id, logprob)] for tokens 1..n-1, and the perplexity."""
    cmd = [ARGS.kvserve, "score", "--model", ARGS.model] + ([] if bos else ["--no-special"]) + [text]
    out = subprocess.run(cmd, capture_output=True, timeout=BOUND, check=True).stdout.decode(errors="replace")
    return parse_table(out)


def parse_table(out):
    rows, ppl = [], None
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0].isdigit():
            rows.append((int(f[1]), float(f[2])))
        elif line.startswith("tokens "):
            ppl = float(f[-1])
    return rows, ppl


class Logprobs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--threads", "1").start()
        cls.c = cls.srv.client()
        cls.score = unary(cls.c.ch, "/kvserve.v1.Generation/Score", pb.ScoreRequest, pb.ScoreReply)

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def test_stream_tokens_carry_logprobs_and_alternatives(self):
        toks, comps = self.c.run_stream(greq(prompt="The cat sat", max_tokens=12, ignore_eos=True, logprobs=True,
                                             top_logprobs=5))
        self.assertEqual(len(toks), 12)
        for t in toks:
            self.assertLess(t.logprob, 0.0 + 1e-12)
            self.assertEqual(len(t.top_logprobs), 5)
            lps = [a.logprob for a in t.top_logprobs]
            self.assertEqual(lps, sorted(lps, reverse=True))
            self.assertEqual(t.top_logprobs[0].token, t.token, "greedy: the most probable token")
            self.assertEqual(t.top_logprobs[0].logprob, t.logprob)
            self.assertGreater(len(t.piece), 0)
            self.assertLessEqual(sum(math.exp(x) for x in lps), 1.0 + 1e-9)

    def test_logprobs_equal_score_rpc_and_the_command_line(self):
        prompt = "Once upon a time"
        toks, comps = self.c.run_stream(greq(prompt=prompt, max_tokens=10, ignore_eos=True, logprobs=True,
                                             sampling=dict(temperature=0.9, seed=7)))
        ids = [t.token for t in toks]
        rep = self.score(pb.ScoreRequest(text=prompt), timeout=BOUND)
        n_prompt = len(rep.token_ids)
        full = self.score(pb.ScoreRequest(ids=list(rep.token_ids) + ids), timeout=BOUND)
        self.assertEqual(len(full.logprobs), n_prompt + len(ids) - 1)
        for i, t in enumerate(toks):  # sampled at temperature 0.9: logprobs are still the model's own
            self.assertAlmostEqual(full.logprobs[n_prompt - 1 + i], t.logprob, delta=TOL)
        rows, ppl = cli_score(prompt)
        self.assertEqual([r[0] for r in rows], list(rep.token_ids[1:]))
        for (tid, lp), got in zip(rows, rep.logprobs):
            self.assertAlmostEqual(got, lp, delta=TOL)
        self.assertAlmostEqual(rep.perplexity, ppl, delta=1e-3)

    def test_submit_step_carry_logprobs(self):
        _, tokens, comp = self.c.run_submit(greq(prompt="abc", max_tokens=4, ignore_eos=True, logprobs=True,
                                                 top_logprobs=1))
        self.assertEqual(len(tokens), 4)
        self.assertTrue(all(len(t.top_logprobs) == 1 and t.logprob < 0 for t in tokens))

    def test_kvctl_score_prints_what_kvserve_score_prints(self):
        text = "a quick brown fox"
        p = subprocess.run([KVCTL, "--addr", self.srv.addr, "score", "--bos", text], capture_output=True, timeout=BOUND)
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        got, gppl = parse_table(p.stdout.decode())
        want, wppl = cli_score(text, bos=True)
        self.assertEqual([g[0] for g in got], [w[0] for w in want])
        for g, w in zip(got, want):
            self.assertAlmostEqual(g[1], w[1], delta=TOL)
        self.assertAlmostEqual(gppl, wppl, delta=1e-3)

    def test_bad_values_name_the_field(self):
        for req, field in ((greq(prompt="x", max_tokens=2, logprobs=True, top_logprobs=21), "top_logprobs"),
                           (greq(prompt="x", max_tokens=2, top_logprobs=2), "top_logprobs")):
            code, details = code_of(lambda: self.c.run_stream(req))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(field, details)
        for req, field in ((pb.ScoreRequest(ids=[5]), "ids"), (pb.ScoreRequest(), "ids"),
                           (pb.ScoreRequest(ids=[5, 99999]), "ids")):
            code, details = code_of(lambda: self.score(req, timeout=BOUND))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertIn(field, details)
        self.c.wait_idle()


class LogprobsAndTheCache(unittest.TestCase):
    def test_not_answered_from_the_prompt_cache(self):
        redis = Redis().start()
        srv = Server("--redis", redis.url(), "--threads", "1").start()
        try:
            c = srv.client()
            req = greq(prompt="cache me", max_tokens=4, logprobs=True)
            for _ in range(3):
                toks, comps = c.run_stream(req)
                self.assertFalse(comps[0].cached)
                self.assertTrue(all(t.logprob < 0 for t in toks))
        finally:
            srv.stop()
            redis.stop()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-logprobs"))
