#!/usr/bin/python3
"""What uncollected Submit results cost other clients: p50/p90 of a 16-token Stream on an idle
server, then after N Submits nobody collects (memory growth from /proc too).

    /usr/bin/python3 bench/uncollected_bench.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto [--n 16000]

Uses the test harness (tests/rpc/harness.py) for servers and stubs.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "rpc"))
_ap = argparse.ArgumentParser(add_help=False)
_ap.add_argument("--n", type=int, default=16000)
_ap.add_argument("--no-max-results", action="store_true", help="a build from before --max-results")
OPT, rest = _ap.parse_known_args()
sys.argv = [sys.argv[0]] + rest
import harness  # noqa: E402
from harness import Server, greq, pb, wait_for  # noqa: E402


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def streams(c, k=40):
    t = []
    for i in range(k):
        t0 = time.monotonic()
        c.run_stream(greq(ids=[5 + i, 6, 7], max_tokens=16, ignore_eos=True))
        t.append((time.monotonic() - t0) * 1000)
    t.sort()
    return statistics.median(t), t[int(len(t) * 0.9)]


def main():
    limit = () if OPT.no_max_results else ("--max-results", str(OPT.n + 10))
    srv = Server("--threads", "1", "--pool-blocks", "4096", *limit).start()
    try:
        c = srv.client()
        p50a, p90a = streams(c)
        rss0 = rss_mb(srv.proc.pid)
        for i in range(OPT.n):
            c.submit(greq(ids=[5, 6, 7, 8 + i % 900], max_tokens=1))
        wait_for(lambda: (lambda st: st.running == 0 and st.waiting == 0)(c.stats()), "the Submits done", limit=600)
        p50b, p90b = streams(c)
        rss1 = rss_mb(srv.proc.pid)
        print(f"{harness.ARGS.kvserve}: stream p50/p90 "
              f"{p50a:.2f}/{p90a:.2f} ms idle, {p50b:.2f}/{p90b:.2f} ms with {OPT.n} uncollected results; "
              f"RSS {rss0:.0f} -> {rss1:.0f} MiB")
        srv.stop()
    finally:
        srv.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
