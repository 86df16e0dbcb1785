#!/usr/bin/python3
"""The harness of kvserve's Python RPC tests (Debian's python3-grpcio): real
`kvserve serve` processes on free loopback ports, real redis-server processes,
generic gRPC stubs over protoc-generated messages, and bounded waits.

A test file does `from harness import *` and ends with
`sys.exit(harness.run(__name__, "rpc-python"))`; it is run as

    /usr/bin/python3 tests/rpc/FILE.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto
        [--keep] [-k PATTERN] [-v]

Importing this module parses those arguments and generates the message
modules with protoc into a temporary directory (removed at exit unless
--keep). Every server is stopped with SIGTERM and must exit 0 without a
sanitizer report; every RPC has a deadline.

Nothing depends on the machine's speed: a test that needs a generation still
running when the client acts holds it with the test hook
KVSERVE_TEST_HOLD_FILE (Server.hold / Server.release; docs/testing.md), and
every wait polls an observable condition (Stats, /metrics, a Health watch)
with a generous bound (BOUND), failing with the state that was not reached.
"""
import argparse
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import grpc

SERVING, NOT_SERVING = 1, 2
STARTED = []  # every Server started, killed at exit if still running
BOUND = 120   # seconds: the bound on every wait for a state (generous: it only guards against hangs)
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),  # (min_reconnect_backoff_ms is also the connect timeout: keep it)
]


# ---- set-up: messages, ports, servers -------------------------------------------------
def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def generate_messages(proto_dir, out):
    global pb, hpb
    gen = os.path.join(out, "gen")
    hp = os.path.join(out, "healthproto")
    os.makedirs(gen)
    os.makedirs(hp)
    subprocess.run(["protoc", "-I", proto_dir, "--python_out=" + gen, "kvserve/v1/kvserve.proto"], check=True,
                   timeout=BOUND)
    # health.proto at a temporary root: a grpc/health/v1 package would shadow the grpc module
    shutil.copy(os.path.join(proto_dir, "grpc", "health", "v1", "health.proto"), hp)
    subprocess.run(["protoc", "-I", hp, "--python_out=" + gen, "health.proto"], check=True, timeout=BOUND)
    pb = load_module("kvserve_pb2", os.path.join(gen, "kvserve", "v1", "kvserve_pb2.py"))
    hpb = load_module("health_pb2", os.path.join(gen, "health_pb2.py"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(cond, what, limit=BOUND, every=0.02):
    """Poll cond() until it returns a true value (returned); fail naming `what` after `limit` seconds."""
    until = time.monotonic() + limit
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > until:
            raise AssertionError(f"not reached within {limit}s: {what}")
        time.sleep(every)


def crash_marks(log):
    marks = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "Segmentation fault", "double free",
             "corrupted", "Assertion", "FATAL", "abort")
    return [m for m in marks if m in log]


class Server:
    """A `kvserve serve` process on a free loopback port."""
    n = 0

    def __init__(self, *args, model=None, creds=None, target_host="127.0.0.1", env=None):
        Server.n += 1
        self.env = env
        self.model = model or ARGS.model
        self.args = list(args)
        self.creds = creds  # channel credentials for TLS servers
        self.port = free_port()
        self.addr = f"{target_host}:{self.port}"
        self.log_path = os.path.join(TMP, f"server{Server.n}.log")
        self.hold_path = os.path.join(TMP, f"server{Server.n}.hold")
        self.proc = None
        self.channels = []

    def start(self, ready_timeout=BOUND):
        STARTED.append(self)
        for attempt in range(5):
            try:
                return self._start(ready_timeout)
            except AssertionError:
                # another process took the "free" port between free_port() and kvserve's bind: another port
                if attempt == 4 or self.proc.poll() is None or "cannot listen" not in self.log():
                    raise
                self.close_channels()
                self.logf.close()
                self.port = free_port()
                self.addr = f"{self.addr.rsplit(':', 1)[0]}:{self.port}"

    def _start(self, ready_timeout):
        cmd = [ARGS.kvserve, "serve", "--model", self.model, "--listen", f"127.0.0.1:{self.port}"] + self.args
        self.logf = open(self.log_path, "w")
        env = dict(self.env if self.env is not None else os.environ, KVSERVE_TEST_HOLD_FILE=self.hold_path)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logf,
                                     env=env)
        ch = self.channel()
        check = unary(ch, "/grpc.health.v1.Health/Check", hpb.HealthCheckRequest, hpb.HealthCheckResponse)
        until = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"kvserve exited with {self.proc.returncode} before serving:\n{self.log()}")
            if time.monotonic() > until:
                self.kill()
                raise AssertionError(f"kvserve not SERVING within {ready_timeout}s:\n{self.log()}")
            try:
                # wait_for_ready: a fail-fast call would not drive the (TLS) connection attempt
                if check(hpb.HealthCheckRequest(), timeout=2, wait_for_ready=True).status == SERVING:
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.05)

    def hold(self, n):
        """From the next engine step on, no request generates more than n tokens (they stay running)."""
        tmp = self.hold_path + ".new"
        with open(tmp, "w") as f:
            f.write(f"{n}\n")
        os.replace(tmp, self.hold_path)  # atomic: the server never reads half a file

    def release(self):
        """Lift the hold: held requests go on."""
        try:
            os.remove(self.hold_path)
        except FileNotFoundError:
            pass

    def channel(self, creds="default", options=()):
        creds = self.creds if creds == "default" else creds
        opts = FAST_RECONNECT + list(options)
        ch = grpc.secure_channel(self.addr, creds, opts) if creds else grpc.insecure_channel(self.addr, opts)
        self.channels.append(ch)
        return ch

    def client(self, token=None, creds="default"):
        return Client(self.channel(creds), token)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kvserve did not exit within {timeout}s of SIGTERM:\n{self.log()[-4000:]}")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close_channels(self):
        for ch in self.channels:
            ch.close()
        self.channels = []

    def stop(self, timeout=BOUND):
        """SIGTERM, wait, and check: exit code 0, no crash report."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.terminate()
        rc = self.wait(timeout)
        self.close_channels()
        self.logf.close()
        self.assert_clean(rc)

    def assert_clean(self, rc):
        log = self.log()
        if rc != 0 or crash_marks(log):
            raise AssertionError(f"kvserve exit code {rc} (0 expected), crash marks {crash_marks(log)}:\n"
                                 f"{log[-4000:]}")


def unary(ch, path, req, rep):
    return ch.unary_unary(path, request_serializer=req.SerializeToString, response_deserializer=rep.FromString)


def ustream(ch, path, req, rep):
    return ch.unary_stream(path, request_serializer=req.SerializeToString, response_deserializer=rep.FromString)


class Client:
    """Generic stubs for every method, with the caller's bearer token."""

    def __init__(self, ch, token=None):
        self.ch = ch
        self.md = [("authorization", "Bearer " + token)] if token else None
        G, A, H = "/kvserve.v1.Generation/", "/kvserve.v1.Agents/", "/grpc.health.v1.Health/"
        self._submit = unary(ch, G + "Submit", pb.GenerateRequest, pb.SubmitReply)
        self._step = unary(ch, G + "Step", pb.StepRequest, pb.StepReply)
        self._stream = ustream(ch, G + "Stream", pb.GenerateRequest, pb.StreamEvent)
        self._cancel = unary(ch, G + "Cancel", pb.CancelRequest, pb.CancelReply)
        self._stats = unary(ch, G + "Stats", pb.StatsRequest, pb.StatsReply)
        self._get = unary(ch, A + "GetAgent", pb.AgentRequest, pb.AgentInfo)
        self._list = unary(ch, A + "ListAgents", pb.ListAgentsRequest, pb.ListAgentsReply)
        self._drop = unary(ch, A + "DropAgent", pb.AgentRequest, pb.DropAgentReply)
        self._export = unary(ch, A + "ExportAgent", pb.AgentRequest, pb.ExportAgentReply)
        self._import = unary(ch, A + "ImportAgent", pb.ImportAgentRequest, pb.AgentInfo)
        self._check = unary(ch, H + "Check", hpb.HealthCheckRequest, hpb.HealthCheckResponse)
        self._watch = ustream(ch, H + "Watch", hpb.HealthCheckRequest, hpb.HealthCheckResponse)

    def submit(self, req, timeout=BOUND):
        return self._submit(req, timeout=timeout, metadata=self.md).id

    def step(self, ids, wait_ms=0, timeout=BOUND):
        return self._step(pb.StepRequest(ids=ids, wait_ms=wait_ms), timeout=timeout, metadata=self.md)

    def stream(self, req, timeout=BOUND):
        return self._stream(req, timeout=timeout, metadata=self.md)

    def cancel(self, id_, timeout=BOUND):
        return self._cancel(pb.CancelRequest(id=id_), timeout=timeout, metadata=self.md)

    def stats(self, timeout=BOUND):
        return self._stats(pb.StatsRequest(), timeout=timeout, metadata=self.md)

    def get_agent(self, agent_id, timeout=BOUND):
        return self._get(pb.AgentRequest(agent_id=agent_id), timeout=timeout, metadata=self.md)

    def list_agents(self, timeout=BOUND):
        return self._list(pb.ListAgentsRequest(), timeout=timeout, metadata=self.md).agents

    def drop_agent(self, agent_id, timeout=BOUND):
        return self._drop(pb.AgentRequest(agent_id=agent_id), timeout=timeout, metadata=self.md)

    def export_agent(self, agent_id, timeout=BOUND):
        return self._export(pb.AgentRequest(agent_id=agent_id), timeout=timeout, metadata=self.md).data

    def import_agent(self, agent_id, data, timeout=BOUND):
        return self._import(pb.ImportAgentRequest(agent_id=agent_id, data=data), timeout=timeout, metadata=self.md)

    def health(self, service="", timeout=BOUND):
        return self._check(hpb.HealthCheckRequest(service=service), timeout=timeout).status

    def watch(self, service="", timeout=BOUND):
        return self._watch(hpb.HealthCheckRequest(service=service), timeout=timeout)

    # -- whole generations
    def run_submit(self, req, limit=BOUND):
        """Submit, then Step (long-polling) until the completion: (tokens, completion)."""
        id_ = self.submit(req)
        tokens, until = [], time.monotonic() + limit
        while time.monotonic() < until:
            rep = self.step([id_], wait_ms=1000, timeout=BOUND)
            tokens += list(rep.tokens)
            if rep.completions:
                assert len(rep.completions) == 1, rep
                return id_, tokens, rep.completions[0]
        raise AssertionError(f"no completion for request {id_} within {limit}s")

    def run_stream(self, req, timeout=BOUND):
        """Stream: (token events, completions)."""
        tokens, comps = [], []
        for ev in self.stream(req, timeout=timeout):
            if ev.WhichOneof("event") == "token":
                assert not comps, "token event after the completion"
                tokens.append(ev.token)
            else:
                comps.append(ev.completion)
        return tokens, comps

    def wait_idle(self, limit=BOUND, agents_blocks=0):
        """Poll Stats until nothing runs or waits and every block not held by agents is free."""
        until = time.monotonic() + limit
        st = None
        while time.monotonic() < until:
            st = self.stats()
            if st.running == 0 and st.waiting == 0 and st.blocks_free + agents_blocks == st.blocks_total:
                return st
            time.sleep(0.02)
        raise AssertionError(f"the server did not become idle within {limit}s; last Stats:\n{st}")

    def wait_stats(self, what, cond, limit=BOUND):
        """Poll Stats until cond(stats); fail naming `what` and the last Stats."""
        last = [None]

        def check():
            last[0] = self.stats()
            return last[0] if cond(last[0]) else None
        try:
            return wait_for(check, what, limit)
        except AssertionError as e:
            raise AssertionError(f"{e}; last Stats:\n{last[0]}") from None


def greq(prompt="", ids=None, max_tokens=16, **kw):
    sampling = kw.pop("sampling", None)
    r = pb.GenerateRequest(prompt=prompt, prompt_ids=ids or [], max_tokens=max_tokens, **kw)
    if sampling is not None:
        r.sampling.CopyFrom(pb.Sampling(**sampling))
    return r


def rand_ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 1024) for _ in range(n)]  # 0..2 are special tokens


def code_of(fn):
    """Status code and details of the RpcError fn() raises (fails if it does not)."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("the call succeeded; an error status was expected")

def run_failing(args, model=None, timeout=BOUND):
    """Run a kvserve serve that should fail at start: (exit code, stderr, seconds)."""
    cmd = [ARGS.kvserve, "serve", "--model", model or ARGS.model] + list(args)
    if "--listen" not in args:
        cmd += ["--listen", f"127.0.0.1:{free_port()}"]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"kvserve {' '.join(args)} still running after {timeout}s (a start-up failure "
                             "was expected)")
    return p.returncode, p.stderr.decode(errors="replace"), time.monotonic() - t0


def error_lines(err):
    """stderr lines that are not the server's timestamped log lines."""
    return [l for l in err.splitlines() if l.strip() and not (l[:4].isdigit() and "Z " in l[:30])]

class TimedResult(unittest.TextTestResult):
    """Prints each test's duration."""

    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        if self.showAll:
            self.stream.writeln(f"    ({time.monotonic() - self._t0:.1f}s)")
            self.stream.flush()

class Redis:
    def __init__(self, port=None):
        self.fixed = port is not None  # a restart on the port the server was told about
        self.port = port or free_port()
        self.proc = None

    def start(self):
        for _ in range(5):  # another process may take a "free" port first: then try another one
            self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            until = time.monotonic() + BOUND
            while time.monotonic() < until and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.proc.kill()
            self.proc.wait(BOUND)
            if self.fixed:
                break
            self.port = free_port()
        raise AssertionError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

def scrape(mport):
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=BOUND).read().decode()
    got = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            got[name] = float(value)
    return got


class RedisServerCase(unittest.TestCase):
    """Tests sharing one Redis and one server started with it (and server_args, which may use cls)."""

    @classmethod
    def server_args(cls):
        return ()

    @classmethod
    def setUpClass(cls):
        cls.redis = Redis().start()
        cls.srv = Server("--redis", cls.redis.url(), "--threads", "1", *cls.server_args()).start()

    @classmethod
    def tearDownClass(cls):
        try:
            cls.srv.stop()
        finally:
            cls.srv.kill()
            cls.redis.stop()


# ---- arguments and messages, at import -------------------------------------------------
def _parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False)
    ap.add_argument("--kvserve", required=True)
    ap.add_argument("--model", required=True, help="the tiny test model")
    ap.add_argument("--proto", required=True, help="the repository's proto/ directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, certificates)")
    args, rest = ap.parse_known_args()
    args.kvserve, args.model = os.path.abspath(args.kvserve), os.path.abspath(args.model)
    return args, rest


ARGS, _REST = _parse()
TMP = tempfile.mkdtemp(prefix="kvserve-rpc-")
pb, hpb = None, None  # kvserve.v1 and grpc.health.v1 messages
generate_messages(os.path.abspath(ARGS.proto), TMP)


def run(module_name, label):
    """Run the module's tests; print "LABEL: N passed, M failed"; the process exit code."""
    try:
        prog = unittest.main(module=sys.modules[module_name], argv=[sys.argv[0]] + _REST, exit=False,
                             testRunner=unittest.TextTestRunner(verbosity=2, stream=sys.stdout,
                                                                resultclass=TimedResult))
        r = prog.result
        failed = len(r.failures) + len(r.errors) + len(r.unexpectedSuccesses)
        passed = r.testsRun - failed - len(r.skipped) - len(r.expectedFailures)
        if r.skipped:
            print(f"{label}: {len(r.skipped)} skipped")
        print(f"{label}: {passed} passed, {failed} failed", flush=True)
        return 1 if failed or r.testsRun == 0 else 0
    finally:
        for srv in STARTED:
            srv.kill()
        if ARGS.keep:
            print(f"{label}: kept {TMP}")
        else:
            shutil.rmtree(TMP, ignore_errors=True)
