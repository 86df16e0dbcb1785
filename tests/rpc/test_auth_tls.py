#!/usr/bin/python3
"""Bearer tokens and tenants, TLS and mTLS with certificates made here by openssl, and start-up
errors (bad certificates, keys, token files, flags) refused with a clear message.

    /usr/bin/python3 tests/rpc/test_auth_tls.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
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


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-auth-tls"))
