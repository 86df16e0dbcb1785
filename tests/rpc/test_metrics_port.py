#!/usr/bin/python3
"""The metrics port needs no token, so it must not be a way to starve the server: slow and idle
clients are cut off (a connection limit per client address, a connection timeout), the rest keep
scraping, the gRPC port keeps serving, and the server's descriptor limit is raised at start.

    /usr/bin/python3 tests/rpc/test_metrics_port.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto

Regression of issue 12's finding 7. Harness: tests/rpc/harness.py.
"""
import resource
import select
import socket
import sys
import unittest
import urllib.request

import harness
from harness import *  # noqa: F401,F403

PER_IP = 8      # server/metrics.h: METRICS_MAX_PER_IP
TIMEOUT_S = 10  # METRICS_TIMEOUT_S


def connect_from(src, port):
    s = socket.socket()
    s.bind((src, 0))  # another loopback address: another "client"
    s.connect(("127.0.0.1", port))
    return s


def closed_by_server(socks):
    """The sockets among socks the server has closed (EOF readable)."""
    done = []
    r, _, _ = select.select(socks, [], [], 0)
    for s in r:
        try:
            if s.recv(4096) == b"":
                done.append(s)
        except ConnectionResetError:
            done.append(s)
    return done


class MetricsPort(unittest.TestCase):
    def test_idle_and_slow_clients_are_cut_off_and_scrapes_go_on(self):
        mport = free_port()
        soft0, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low = min(1024, hard)  # a common default: the server inherits it and must raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        try:
            srv = Server("--metrics", f"127.0.0.1:{mport}", "--threads", "1").start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft0, hard))
        socks = []
        try:
            limits = open(f"/proc/{srv.proc.pid}/limits").read()
            line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
            got = tuple(line.split()[3:5])
            self.assertEqual(got, (str(hard) if hard != resource.RLIM_INFINITY else "unlimited",) * 2,
                             f"the soft descriptor limit was not raised to the hard one: {line}")
            if low < hard:
                self.assertIn(f"descriptor limit raised from {low} to {hard}", srv.log())
            # 40 idle connections and 4 that send half a request, from 127.0.0.2
            idle = [connect_from("127.0.0.2", mport) for _ in range(40)]
            slow = [connect_from("127.0.0.3", mport) for _ in range(4)]
            for s in slow:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            socks = idle + slow
            open_idle = set(idle)
            # beyond the per-address limit, the server closes them at once
            wait_for(lambda: (open_idle.difference_update(closed_by_server(list(open_idle))),
                              len(open_idle) <= PER_IP)[1],
                     f"at most {PER_IP} connections kept from one address")
            # scrapes from another address still work, and so does gRPC
            for _ in range(3):
                text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=BOUND).read().decode()
                self.assertIn("kvserve_requests_total", text)
            self.assertEqual(srv.client().health(timeout=BOUND), SERVING)
            # and after the connection timeout, the idle and the slow ones are all closed
            left = set(socks)
            wait_for(lambda: (left.difference_update(closed_by_server(list(left))), not left)[1],
                     f"idle and half-sent connections closed after the {TIMEOUT_S} s timeout", limit=BOUND)
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=BOUND).read().decode()
            self.assertIn("kvserve_requests_total", text)
            srv.stop()
        finally:
            for s in socks:
                s.close()
            srv.kill()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-metrics-port"))
