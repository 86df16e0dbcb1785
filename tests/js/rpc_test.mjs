#!/usr/bin/env node
// kvserve's gRPC service seen from an independent peer: @grpc/grpc-js (a pure
// JavaScript HTTP/2 + gRPC stack), @grpc/proto-loader, and the generic
// reflection client grpc-js-reflection-client.
//
//   node rpc_test.mjs --kvserve BIN --model DIR --proto DIR [--threads N] [--verbose]
//
// Two servers are started on free loopback ports: an open one and one with
// --token-file (two tenants). Tests: Submit/Step and Stats; Step edge cases
// (duplicate ids, a parked Step abandoned by its client); Stream (tokens then
// one completion, equal to Submit/Step); cancel (client cancel, deadline, the
// Cancel RPC) until every KV block is free; error statuses; bearer tokens and
// tenant isolation; reflection v1 and v1alpha (a client built only from the
// reflected descriptor); Health Check/Watch; 16 concurrent streams equal to
// alone; SIGTERM (in-flight stream finishes, watchers see NOT_SERVING, exit 0).
// Every RPC carries a deadline, every wait is bounded. Nothing depends on the
// machine's speed: a request that must still be running when the client acts
// is held by the test hook KVSERVE_TEST_HOLD_FILE (server.hold(n) /
// server.release(), docs/testing.md), and waits poll an observable state
// (Stats, a Health watch) with a generous bound. The last line is
// "rpc-node: N passed, M failed"; the exit status is non-zero on failure.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { GrpcReflection } = require("grpc-js-reflection-client");
import { KvServer } from "./kvserver.mjs";

// ---- arguments ---------------------------------------------------------------
function usage(msg) {
  if (msg) process.stderr.write(`rpc_test: ${msg}\n`);
  process.stderr.write("usage: node rpc_test.mjs --kvserve BIN --model DIR --proto DIR [--threads N] [--verbose]\n");
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
// one compute thread: the machine is small and shared, and OpenBLAS threads oversubscribed
// by other load slow everything down several times over
const opt = { proto: path.join(here, "..", "..", "proto"), threads: 1, verbose: false };
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
    if (a === "--kvserve") opt.kvserve = val();
    else if (a === "--model") opt.model = val();
    else if (a === "--proto") opt.proto = val();
    else if (a === "--threads") opt.threads = parseInt(val(), 10) || 1;
    else if (a === "--verbose" || a === "-v") opt.verbose = true;
    else if (a === "--help" || a === "-h") usage();
    else if (a.startsWith("--test")) continue; // node:test's own flags
    else usage(`unknown argument ${a}`);
  }
  if (!opt.kvserve || !opt.model) usage("--kvserve and --model are required");
}

// ---- bookkeeping: "rpc-node: N passed, M failed" ------------------------------
let planned = 0;
let passed = 0;
const failures = [];
function t(name, fn, timeout = 300_000) {
  planned++;
  test(name, { timeout }, async (ctx) => {
    try {
      await fn(ctx);
      passed++;
    } catch (e) {
      failures.push(name);
      throw e;
    }
  });
}
process.on("exit", () => {
  const failed = planned - passed; // tests that never ran (a failed start-up) count as failed
  fs.writeSync(1, `rpc-node: ${passed} passed, ${failed} failed\n`);
  if (failed) process.exitCode = 1;
});

// ---- protos and helpers --------------------------------------------------------
const LOADER = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const pkgDef = protoLoader.loadSync(["kvserve/v1/kvserve.proto", "grpc/health/v1/health.proto"], {
  ...LOADER,
  includeDirs: [opt.proto],
});
const proto = grpc.loadPackageDefinition(pkgDef);
const Generation = proto.kvserve.v1.Generation;
const Agents = proto.kvserve.v1.Agents;
const Health = proto.grpc.health.v1.Health;
const insecure = () => grpc.credentials.createInsecure();

const S = grpc.status;
const BOUND = 120_000; // ms: the bound on every wait for a state (generous: it only guards against hangs)
const dl = (ms) => ({ deadline: Date.now() + ms });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...a) => opt.verbose && console.error("[rpc_test]", ...a);

function md(token) {
  const m = new grpc.Metadata();
  if (token !== undefined) m.set("authorization", token);
  return m;
}

/** Unary call -> Promise of the reply; rejects with the gRPC error. */
function unary(client, method, req, { meta = new grpc.Metadata(), ms = BOUND } = {}) {
  return new Promise((resolve, reject) => {
    client[method](req, meta, dl(ms), (err, res) => (err ? reject(err) : resolve(res)));
  });
}

/** Expect a unary call to fail with `code`; returns the error. */
async function unaryFails(client, method, req, code, opts) {
  try {
    const res = await unary(client, method, req, opts);
    assert.fail(`${method} succeeded (${JSON.stringify(res)}), expected status ${code}`);
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    assert.equal(e.code, code, `${method}: status ${e.code} (${e.details}), expected ${code}`);
    return e;
  }
}

/** Server stream -> Promise of {events, status}; rejects on a non-OK status.
 *  onData(ev, call) may cancel the call. */
function collect(call, onData) {
  return new Promise((resolve, reject) => {
    const events = [];
    let status = null;
    let ended = false;
    let error = null;
    const done = () => {
      if (error) reject(error);
      else if (ended && status) resolve({ events, status });
    };
    call.on("data", (ev) => {
      events.push(ev);
      if (onData) onData(ev, call, events);
    });
    call.on("status", (st) => {
      status = st;
      done();
    });
    call.on("end", () => {
      ended = true;
      done();
    });
    call.on("error", (e) => {
      e.events = events;
      error = e;
      reject(e);
    });
  });
}

function stream(client, req, { meta = new grpc.Metadata(), ms = BOUND, onData } = {}) {
  return collect(client.Stream(req, meta, dl(ms)), onData);
}

/** Split a Stream's events into tokens and the completion, checking their shape. */
function streamResult(events) {
  const tokens = [];
  const comps = [];
  for (const ev of events) {
    if (ev.event === "token") {
      assert.equal(comps.length, 0, "a token event after the completion");
      tokens.push(ev.token);
    } else if (ev.event === "completion") comps.push(ev.completion);
    else assert.fail(`a StreamEvent with no event set: ${JSON.stringify(ev)}`);
  }
  assert.equal(comps.length, 1, `expected exactly one completion, got ${comps.length}`);
  return checkTokensVsCompletion(tokens, comps[0]);
}

/** Token events agree with the completion: ids, indices, concatenated text. */
function checkTokensVsCompletion(tokens, c) {
  tokens.forEach((tk, i) => {
    assert.equal(tk.index, i, `token event ${i} has index ${tk.index}`);
    assert.equal(tk.id, c.id, `token event ${i} has request id ${tk.id}, completion ${c.id}`);
  });
  assert.equal(tokens.map((x) => x.text).join(""), c.text, "completion.text != concatenated token texts");
  assert.deepEqual(
    tokens.map((x) => x.token),
    c.token_ids,
    "token events' ids != completion.token_ids",
  );
  assert.equal(c.usage.generated_tokens, c.token_ids.length, "usage.generated_tokens != number of token_ids");
  return { tokens, completion: c, text: c.text, ids: c.token_ids };
}

/** Submit, then Step until the completion (bounded). */
async function submitAndPoll(client, req, { meta = new grpc.Metadata(), limitMs = BOUND } = {}) {
  const { id } = await unary(client, "Submit", req, { meta });
  assert.match(String(id), /^[0-9]+$/);
  assert.notEqual(String(id), "0", "Submit returned id 0");
  const tokens = [];
  let completion = null;
  const until = Date.now() + limitMs;
  while (!completion) {
    assert.ok(Date.now() < until, `request ${id}: no completion after ${limitMs} ms of Step`);
    const r = await unary(client, "Step", { ids: [id], wait_ms: 1000 }, { meta });
    for (const tk of r.tokens) tokens.push(tk);
    for (const c of r.completions) {
      assert.equal(completion, null, "two completions for one request");
      assert.equal(c.id, id);
      completion = c;
    }
  }
  return { id, ...checkTokensVsCompletion(tokens, completion) };
}

/** Step an already submitted request until its completion (bounded). */
async function submitAndPollExisting(client, id, { meta = new grpc.Metadata(), limitMs = BOUND } = {}) {
  const until = Date.now() + limitMs;
  while (Date.now() < until) {
    const r = await unary(client, "Step", { ids: [id], wait_ms: 1000 }, { meta });
    if (r.completions.length) return r.completions[0];
  }
  assert.fail(`request ${id}: no completion after ${limitMs} ms of Step`);
}

/** Cleanup: drop an agent once its requests are done (bounded, errors ignored). */
async function dropAgentWhenIdle(client, agent_id, meta = new grpc.Metadata()) {
  const until = Date.now() + BOUND;
  while (Date.now() < until) {
    try {
      await unary(client, "DropAgent", { agent_id }, { meta });
      return;
    } catch (e) {
      if (e.code === S.NOT_FOUND) return;
      await sleep(20); // busy
    }
  }
}

async function waitIdle(client, { meta, limitMs = BOUND } = {}) {
  return waitStats(client, "idle", (st) => st.blocks_free === st.blocks_total && st.running === 0 && st.waiting === 0,
                   { meta, limitMs });
}

/** Poll Stats until cond(stats); fail naming the state and the last Stats. */
async function waitStats(client, what, cond, { meta, limitMs = BOUND } = {}) {
  const until = Date.now() + limitMs;
  let st;
  for (;;) {
    st = await unary(client, "Stats", {}, { meta });
    if (cond(st)) return st;
    if (Date.now() > until) assert.fail(`not ${what} after ${limitMs} ms: ${JSON.stringify(st)}`);
    await sleep(20);
  }
}

// ---- servers -------------------------------------------------------------------
class Server extends KvServer {
  constructor(name, extra = [], grace = 10) {
    super({ kvserve: opt.kvserve, model: opt.model, proto: opt.proto, tmp, threads: opt.threads, verbose: opt.verbose,
            name, extra, grace });
  }
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "kvserve-rpc-node-"));
const TOKEN_A = "tok-alpha-7f3a9c";
const TOKEN_B = "tok-bravo-41d2e8";
fs.writeFileSync(path.join(tmp, "tokens"), `# test tokens\n${TOKEN_A} tenant-a\n${TOKEN_B} tenant-b\n`);
// the open server's grace is long: the SIGTERM test shows it exits as soon as its last stream ends
const open = new Server("open", [], 600);
const authed = new Server("auth", ["--token-file", path.join(tmp, "tokens")]);
const clients = [];
let gen, agents, health; // on the open server
let ready = false;

function track(c) {
  clients.push(c);
  return c;
}

before(async () => {
  await Promise.all([open.start(), authed.start()]);
  gen = track(new Generation(open.addr, insecure()));
  agents = track(new Agents(open.addr, insecure()));
  health = track(new Health(open.addr, insecure()));
  ready = true;
});

after(async () => {
  for (const c of clients) c.close();
  // in case the shutdown test did not run
  await Promise.all([open.stop(5000), authed.stop(5000)]);
  if (failures.length && !opt.verbose) {
    for (const s of [open, authed])
      process.stderr.write(`---- ${s.name} server stderr (last 3000 chars) ----\n${s.stderr.slice(-3000)}\n`);
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

const GREEDY = (prompt, n = 24) => ({
  prompt,
  max_tokens: n,
  ignore_eos: true,
  add_special_tokens: true,
  sampling: { temperature: 0 },
});

// ---- 1. Submit + Step, Stats -------------------------------------------------------
let submitRef = null; // the Submit/Step result of GREEDY("The quick brown fox")

t("Submit + Step polling until completion; unary Stats", async () => {
  assert.ok(ready);
  const r = await submitAndPoll(gen, GREEDY("The quick brown fox"));
  assert.equal(r.completion.finish_reason, "LENGTH");
  assert.equal(r.ids.length, 24);
  assert.equal(r.completion.usage.generated_tokens, 24);
  assert.ok(r.completion.usage.prompt_tokens > 0, "usage.prompt_tokens is 0");
  assert.equal(r.completion.error, "");
  submitRef = r;
  // a collected request is forgotten
  const e = await unaryFails(gen, "Step", { ids: [r.id], wait_ms: 0 }, S.NOT_FOUND);
  assert.match(e.details, /ids/);

  // same request again: deterministic, and (prefix cache) the same answer
  const again = await submitAndPoll(gen, GREEDY("The quick brown fox"));
  assert.deepEqual(again.ids, r.ids, "greedy Submit is not deterministic");
  assert.notEqual(again.id, r.id, "two Submits got the same id");

  const st = await unary(gen, "Stats", {});
  for (const k of ["blocks_total", "blocks_free", "blocks_used", "blocks_shared", "blocks_cached", "block_tokens",
                   "running", "waiting", "agents"])
    assert.equal(typeof st[k], "number", `Stats.${k} missing`);
  assert.ok(st.blocks_total > 0, "blocks_total is 0");
  assert.equal(st.block_tokens, 16);
  assert.equal(st.blocks_free + st.blocks_used, st.blocks_total, "free + used != total");
  assert.ok(st.blocks_cached <= st.blocks_free, "cached blocks exceed free ones");
  const idle = await waitIdle(gen);
  assert.equal(idle.agents, 0);
});

// ---- 1b. Step edge cases ----------------------------------------------------------------
t("Step: duplicate ids are refused or answered once", async () => {
  const { id } = await unary(gen, "Submit", GREEDY("Duplicate ids", 6));
  await waitIdle(gen); // it has finished: its tokens and completion are buffered
  let r;
  try {
    r = await unary(gen, "Step", { ids: [id, id], wait_ms: 1000 });
  } catch (e) {
    assert.equal(e.code, S.INVALID_ARGUMENT, `Step([id, id]): ${e.code} ${e.details}`);
    assert.match(e.details, /ids/);
    return;
  }
  const idx = r.tokens.map((x) => x.index);
  assert.deepEqual(idx, [...new Set(idx)], `Step([id, id]) returned every token event twice: indices ${idx}`);
  assert.ok(r.completions.length <= 1, `Step([id, id]) returned ${r.completions.length} completions for one request`);
  await waitIdle(gen);
});

t("Step: a parked Step its client abandoned (deadline) does not swallow events", async () => {
  // a2 waits behind a1 (held) on the same agent, so a Step on a2 parks; its client gives up after 30 ms
  try {
    open.hold(1);
    const a1 = await unary(gen, "Submit", { ...GREEDY("first on the agent", 450), agent_id: "parked-step" });
    const a2 = await unary(gen, "Submit", { ...GREEDY("second", 8), agent_id: "parked-step" });
    const tokens = [];
    let comp = null;
    try {
      const r = await unary(gen, "Step", { ids: [a2.id], wait_ms: 5000 }, { ms: 30 });
      tokens.push(...r.tokens); // the server answered in time: fine too
      comp = r.completions[0] ?? null;
      log("parked Step answered in time:", r.tokens.length, "tokens");
    } catch (e) {
      assert.equal(e.code, S.DEADLINE_EXCEEDED, `${e.code} ${e.details}`);
      log("parked Step: deadline exceeded");
    }
    // let a1 finish and a2 run while only the abandoned Step waits on a2
    open.release();
    const a1done = await submitAndPollExisting(gen, a1.id);
    assert.equal(a1done.finish_reason, "LENGTH");
    await waitStats(gen, "done with a2", (st) => st.running === 0 && st.waiting === 0);
    const until = Date.now() + BOUND;
    while (!comp && Date.now() < until) {
      const r = await unary(gen, "Step", { ids: [a2.id], wait_ms: 1000 });
      tokens.push(...r.tokens);
      comp = r.completions[0] ?? null;
    }
    assert.ok(comp, "a2 did not complete");
    assert.deepEqual(tokens.map((x) => x.index), comp.token_ids.map((_, i) => i),
                     "token events were lost: they went to the Step whose client had already given up");
  } finally {
    open.release();
    await dropAgentWhenIdle(agents, "parked-step");
  }
  await waitIdle(gen);
});

// ---- 2. Stream ---------------------------------------------------------------------
t("Stream: tokens then one completion; greedy equals Submit/Step", async () => {
  assert.ok(submitRef, "needs the Submit/Step result of the previous test");
  const { events, status } = await stream(gen, GREEDY("The quick brown fox"));
  assert.equal(status.code, S.OK);
  const r = streamResult(events);
  assert.equal(events.at(-1).event, "completion", "the completion is not the last event");
  assert.equal(r.completion.finish_reason, "LENGTH");
  assert.equal(r.tokens.length, 24, "expected one token event per generated token");
  assert.deepEqual(r.ids, submitRef.ids, "Stream's greedy tokens differ from Submit/Step's");
  assert.equal(r.text, submitRef.text, "Stream's text differs from Submit/Step's");

  // seeded sampling reproduces, over both paths
  const seeded = { ...GREEDY("Once upon a time", 20), sampling: { temperature: 0.9, top_k: 40, seed: "1234" } };
  const s1 = streamResult((await stream(gen, seeded)).events);
  const s2 = await submitAndPoll(gen, seeded);
  assert.deepEqual(s1.ids, s2.ids, "seeded sampling differs between Stream and Submit/Step");

  // stop strings: cut before the stop string, finish STOP
  if (submitRef.text.length > 4) {
    const stopAt = submitRef.text.slice(Math.floor(submitRef.text.length / 2)).trim().slice(0, 3);
    if (stopAt.length) {
      const cut = streamResult((await stream(gen, { ...GREEDY("The quick brown fox"), stop: [stopAt] })).events);
      log("stop", JSON.stringify(stopAt), "full", JSON.stringify(submitRef.text), "cut", JSON.stringify(cut.text));
      assert.equal(cut.completion.finish_reason, "STOP", `stop ${JSON.stringify(stopAt)} did not stop`);
      assert.ok(!cut.text.includes(stopAt), "the stop string is in the output");
      assert.ok(submitRef.text.startsWith(cut.text), "stopped text is not a prefix of the full text");
    }
  }
});

// ---- 3. Cancel -------------------------------------------------------------------------
t("Cancel mid-stream frees every block; Cancel RPC on a Submit", async () => {
  const base = await waitIdle(gen);
  try {
    await cancelTests(base);
  } finally {
    open.release();
  }
});

async function cancelTests(base) {
  open.hold(3); // the stream stops at 3 tokens, running, until it is cancelled
  let sawTokens = 0;
  const call = gen.Stream(GREEDY("Cancel me please, I am a long generation", 400), new grpc.Metadata(), dl(BOUND));
  let err = null;
  try {
    await collect(call, (ev, c) => {
      if (ev.event === "token" && ++sawTokens === 3) c.cancel();
    });
  } catch (e) {
    err = e;
  }
  assert.ok(err, `the stream completed before the cancel (${sawTokens} tokens)`);
  assert.equal(err.code, S.CANCELLED, `status ${err.code} ${err.details}`);
  assert.ok(!err.events.some((e) => e.event === "completion"), "a completion arrived although cancelled early");
  const idle = await waitIdle(gen);
  assert.equal(idle.blocks_total, base.blocks_total);

  // Cancel RPC on a queued/running Submit: finish_reason CANCELLED through Step
  open.hold(1);
  const { id } = await unary(gen, "Submit", GREEDY("Another long one to cancel", 400));
  await unary(gen, "Cancel", { id });
  const comp = await submitAndPollExisting(gen, id);
  assert.equal(comp.finish_reason, "CANCELLED");
  assert.ok(comp.token_ids.length <= 1, `the held request generated ${comp.token_ids.length} tokens`);
  await unaryFails(gen, "Cancel", { id }, S.NOT_FOUND); // collected
  await unaryFails(gen, "Cancel", { id: "987654321" }, S.NOT_FOUND);
  await waitIdle(gen);

  // a Stream whose deadline expires is cancelled in the engine too (held: it cannot finish in time)
  try {
    await stream(gen, GREEDY("Out of time", 450), { ms: 30 });
    assert.fail("a held Stream finished");
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    assert.equal(e.code, S.DEADLINE_EXCEEDED, `${e.code} ${e.details}`);
  }
  await waitIdle(gen);
}

// ---- 4. Errors -----------------------------------------------------------------------------
t("errors: INVALID_ARGUMENT naming the field; UNIMPLEMENTED for unknown methods", async () => {
  let e = await unaryFails(gen, "Submit", { prompt: "", max_tokens: 8 }, S.INVALID_ARGUMENT);
  assert.match(e.details, /prompt/, `message does not name the field: "${e.details}"`);
  try {
    await stream(gen, { prompt: "", max_tokens: 8 });
    assert.fail("Stream with an empty prompt succeeded");
  } catch (x) {
    if (x instanceof assert.AssertionError) throw x;
    assert.equal(x.code, S.INVALID_ARGUMENT, `Stream: ${x.code} ${x.details}`);
    assert.match(x.details, /prompt/);
  }
  e = await unaryFails(gen, "Submit", { prompt: "hi", max_tokens: 0 }, S.INVALID_ARGUMENT);
  assert.match(e.details, /max_tokens/, `message does not name the field: "${e.details}"`);
  e = await unaryFails(gen, "Submit", { prompt_ids: [1, 2, 99999], max_tokens: 4 }, S.INVALID_ARGUMENT);
  assert.match(e.details, /prompt/, `message does not name the field: "${e.details}"`);
  e = await unaryFails(gen, "Submit", { prompt: "hi", max_tokens: 100000 }, S.INVALID_ARGUMENT);
  assert.match(e.details, /max_tokens|context/, `"${e.details}"`);
  e = await unaryFails(gen, "Step", { ids: [], wait_ms: 0 }, S.INVALID_ARGUMENT);
  assert.match(e.details, /ids/);
  e = await unaryFails(agents, "GetAgent", { agent_id: "" }, S.INVALID_ARGUMENT);
  assert.match(e.details, /agent_id/);
  await unaryFails(agents, "GetAgent", { agent_id: "nobody" }, S.NOT_FOUND);

  // unknown methods through a generic client (raw bytes, no proto)
  const raw = track(new grpc.Client(open.addr, insecure()));
  const rawUnary = (method) =>
    new Promise((resolve) => {
      raw.makeUnaryRequest(method, (b) => b, (b) => b, Buffer.alloc(0), new grpc.Metadata(), dl(5000),
                           (err, res) => resolve(err || { code: S.OK, res }));
    });
  for (const m of ["/kvserve.v1.Nope/X", "/kvserve.v1.Generation/Nope"]) {
    const r = await rawUnary(m);
    assert.equal(r.code, S.UNIMPLEMENTED, `${m}: status ${r.code} ${r.details}`);
  }
  // a malformed message is refused, not crashed on
  const r = await new Promise((resolve) =>
    raw.makeUnaryRequest("/kvserve.v1.Generation/Submit", (b) => b, (b) => b, Buffer.from([0x0a, 0xff, 0xff]),
                         new grpc.Metadata(), dl(5000), (err, res) => resolve(err || { code: S.OK, res })));
  assert.equal(r.code, S.INVALID_ARGUMENT, `malformed Submit: ${r.code} ${r.details}`);
  // and the server still answers
  await unary(gen, "Stats", {});
});

// ---- 5. Auth ---------------------------------------------------------------------------------
t("auth: UNAUTHENTICATED without a token; bearer tokens; tenant isolation of agents", async () => {
  const g = track(new Generation(authed.addr, insecure()));
  const a = track(new Agents(authed.addr, insecure()));
  const h = track(new Health(authed.addr, insecure()));
  const A = { meta: md(`Bearer ${TOKEN_A}`) };
  const B = { meta: md(`Bearer ${TOKEN_B}`) };

  const e = await unaryFails(g, "Stats", {}, S.UNAUTHENTICATED);
  assert.match(e.details, /token/i);
  await unaryFails(g, "Submit", GREEDY("hi", 4), S.UNAUTHENTICATED);
  await unaryFails(g, "Stats", {}, S.UNAUTHENTICATED, { meta: md("Bearer wrong-token") });
  await unaryFails(g, "Stats", {}, S.UNAUTHENTICATED, { meta: md(TOKEN_A) }); // no "Bearer "
  await unaryFails(a, "ListAgents", {}, S.UNAUTHENTICATED);
  try {
    await stream(g, GREEDY("hi", 4));
    assert.fail("Stream without a token succeeded");
  } catch (x) {
    if (x instanceof assert.AssertionError) throw x;
    assert.equal(x.code, S.UNAUTHENTICATED);
  }
  // health needs no token
  assert.equal((await unary(h, "Check", { service: "" })).status, "SERVING");

  // valid tokens work
  const st = await unary(g, "Stats", {}, A);
  assert.ok(st.blocks_total > 0);
  const s = streamResult((await stream(g, GREEDY("The quick brown fox"), B)).events);
  if (submitRef) assert.deepEqual(s.ids, submitRef.ids, "same request, other server, other tokens");

  // tenant A builds an agent
  const r1 = await submitAndPoll(g, { ...GREEDY("My name is Ada.", 6), agent_id: "shared-name" }, A);
  assert.equal(r1.completion.finish_reason, "LENGTH");
  const infoA = await unary(a, "GetAgent", { agent_id: "shared-name" }, A);
  assert.equal(infoA.agent_id, "shared-name");
  assert.ok(infoA.tokens >= r1.completion.usage.prompt_tokens, `agent history ${infoA.tokens} too short`);
  const listA = await unary(a, "ListAgents", {}, A);
  assert.deepEqual(listA.agents.map((x) => x.agent_id), ["shared-name"]);

  // tenant B sees none of it
  await unaryFails(a, "GetAgent", { agent_id: "shared-name" }, S.NOT_FOUND, B);
  await unaryFails(a, "ExportAgent", { agent_id: "shared-name" }, S.NOT_FOUND, B);
  await unaryFails(a, "DropAgent", { agent_id: "shared-name" }, S.NOT_FOUND, B);
  assert.deepEqual((await unary(a, "ListAgents", {}, B)).agents, []);
  // nor A's requests
  const { id } = await unary(g, "Submit", GREEDY("tenant A's request", 8), A);
  await unaryFails(g, "Step", { ids: [id], wait_ms: 0 }, S.NOT_FOUND, B);
  await unaryFails(g, "Cancel", { id }, S.NOT_FOUND, B);
  const rA = await submitAndPollExisting(g, id, A);
  assert.equal(rA.finish_reason, "LENGTH");

  // B's own agent of the same name is a separate context
  const r2 = await submitAndPoll(g, { ...GREEDY("Hello", 3), agent_id: "shared-name" }, B);
  const infoB = await unary(a, "GetAgent", { agent_id: "shared-name" }, B);
  assert.ok(infoB.tokens < infoA.tokens + 9, `B's agent holds A's history (${infoB.tokens} tokens)`);
  assert.equal(r2.completion.usage.prompt_tokens, infoB.tokens - r2.ids.length,
               "B's agent prompt_tokens includes another history");
  const infoA2 = await unary(a, "GetAgent", { agent_id: "shared-name" }, A);
  assert.equal(infoA2.tokens, infoA.tokens, "A's agent changed when B used the same name");

  // export/import stays within the tenant; drop cleans up
  const exp = await unary(a, "ExportAgent", { agent_id: "shared-name" }, A);
  assert.ok(exp.data.length > 0);
  const imp = await unary(a, "ImportAgent", { agent_id: "copy", data: exp.data }, A);
  assert.equal(imp.tokens, infoA.tokens);
  await unaryFails(a, "GetAgent", { agent_id: "copy" }, S.NOT_FOUND, B);
  for (const [who, ids] of [[A, ["shared-name", "copy"]], [B, ["shared-name"]]])
    for (const agent_id of ids) await unary(a, "DropAgent", { agent_id }, who);
  await unaryFails(a, "GetAgent", { agent_id: "shared-name" }, S.NOT_FOUND, A);
  const fin = await waitIdle(g, { meta: A.meta, limitMs: 10000 });
  assert.equal(fin.agents, 0);
});

// ---- 6. Reflection -----------------------------------------------------------------------------
t("reflection (v1 and v1alpha): list services, descriptor by symbol, call with it", async () => {
  for (const version of ["v1", "v1alpha"]) {
    const refl = new GrpcReflection(open.addr, insecure(), {}, version);
    try {
      const services = await refl.listServices("*", new grpc.Metadata(), dl(5000));
      for (const want of ["kvserve.v1.Generation", "kvserve.v1.Agents", "grpc.health.v1.Health"])
        assert.ok(services.includes(want), `${version}: ${want} not listed (${services.join(", ")})`);

      const methods = (await refl.listMethods("kvserve.v1.Generation", new grpc.Metadata(), dl(5000)))
        .map((m) => m.name)
        .sort();
      assert.deepEqual(methods, ["Cancel", "Score", "Stats", "Step", "Stream", "Submit"], `${version}: methods`);

      // a client built only from the reflected descriptor
      const desc = await refl.getDescriptorBySymbol("kvserve.v1.Generation", new grpc.Metadata(), dl(5000));
      const pkg = desc.getPackageObject(LOADER);
      const RGen = pkg?.kvserve?.v1?.Generation;
      assert.equal(typeof RGen, "function", `${version}: no kvserve.v1.Generation in the reflected descriptor`);
      const rg = track(new RGen(open.addr, insecure()));
      const st = await unary(rg, "Stats", {});
      assert.ok(st.blocks_total > 0 && st.block_tokens === 16, `${version}: Stats via reflection ${JSON.stringify(st)}`);
      const r = streamResult((await stream(rg, GREEDY("The quick brown fox"))).events);
      if (submitRef) assert.deepEqual(r.ids, submitRef.ids, `${version}: Stream via reflection differs`);
      const sub = await submitAndPoll(rg, GREEDY("The quick brown fox"));
      if (submitRef) assert.deepEqual(sub.ids, submitRef.ids, `${version}: Submit via reflection differs`);

      // a symbol inside the file (a message, a method) finds the same file; unknown ones fail
      const byMsg = await refl.getDescriptorBySymbol("kvserve.v1.StatsReply", new grpc.Metadata(), dl(5000));
      assert.ok(byMsg.getProtobufJsRoot().lookup("kvserve.v1.Agents"), `${version}: by message`);
      const byMethod = await refl.getDescriptorBySymbol("kvserve.v1.Generation.Submit", new grpc.Metadata(), dl(5000));
      assert.ok(byMethod.getProtobufJsRoot().lookup("kvserve.v1.Generation"), `${version}: by method`);
      await assert.rejects(refl.getDescriptorBySymbol("no.such.Service", new grpc.Metadata(), dl(5000)),
                           /not found/i, `${version}: unknown symbol`);

      // the health descriptor by file name, and a call through it
      const hd = await refl.getDescriptorByFileName("grpc/health/v1/health.proto", new grpc.Metadata(), dl(5000));
      const RH = hd.getPackageObject(LOADER)?.grpc?.health?.v1?.Health;
      assert.equal(typeof RH, "function", `${version}: no grpc.health.v1.Health by file name`);
      const rh = track(new RH(open.addr, insecure()));
      assert.equal((await unary(rh, "Check", { service: "kvserve.v1.Generation" })).status, "SERVING");
    } finally {
      refl.client?.close?.();
    }
  }
  // with tokens, reflection is behind the same authentication
  const refl = new GrpcReflection(authed.addr, insecure(), {}, "v1");
  try {
    await assert.rejects(refl.listServices("*", new grpc.Metadata(), dl(5000)), /UNAUTHENTICATED|16/);
    const services = await refl.listServices("*", md(`Bearer ${TOKEN_A}`), dl(5000));
    assert.ok(services.includes("kvserve.v1.Generation"));
  } finally {
    refl.client?.close?.();
  }
});

// ---- 7. Health ----------------------------------------------------------------------------------
t("Health: Check and Watch report SERVING; unknown services", async () => {
  for (const service of ["", "kvserve.v1.Generation", "kvserve.v1.Agents"])
    assert.equal((await unary(health, "Check", { service })).status, "SERVING", `Check(${service})`);
  await unaryFails(health, "Check", { service: "no.such.Service" }, S.NOT_FOUND);

  const watch = (service) =>
    new Promise((resolve, reject) => {
      const call = health.Watch({ service }, new grpc.Metadata(), dl(BOUND));
      const timer = setTimeout(() => {
        call.cancel();
        reject(new Error(`Watch(${service}): nothing within ${BOUND} ms`));
      }, BOUND);
      call.on("data", (m) => {
        clearTimeout(timer);
        resolve(m.status);
        call.cancel();
      });
      call.on("error", (e) => {
        clearTimeout(timer);
        if (e.code !== S.CANCELLED) reject(e);
      });
    });
  assert.equal(await watch(""), "SERVING");
  assert.equal(await watch("kvserve.v1.Generation"), "SERVING");
  assert.equal(await watch("no.such.Service"), "SERVICE_UNKNOWN");
  // cancelled watchers are forgotten: the server keeps answering
  assert.equal((await unary(health, "Check", { service: "" })).status, "SERVING");
});

// ---- 8. Concurrency -----------------------------------------------------------------------------
t("16 concurrent streams each produce the same tokens as alone", async () => {
  const reqs = Array.from({ length: 16 }, (_, i) => {
    const r = GREEDY(`Stream number ${i}: ${"abcdefghijklmnop".slice(0, i + 1)}`, 24 + (i % 5) * 4);
    if (i % 4 === 3) r.sampling = { temperature: 0.8, top_p: 0.9, seed: String(100 + i) };
    return r;
  });
  const alone = [];
  for (const r of reqs) alone.push(streamResult((await stream(gen, r)).events));
  // two channels, eight streams each
  const g2 = track(new Generation(open.addr, insecure(), { "grpc.use_local_subchannel_pool": 1 }));
  const together = await Promise.all(
    reqs.map((r, i) => stream(i % 2 ? g2 : gen, r).then((x) => streamResult(x.events))),
  );
  together.forEach((x, i) => {
    assert.deepEqual(x.ids, alone[i].ids, `stream ${i}: concurrent tokens differ from alone`);
    assert.equal(x.text, alone[i].text, `stream ${i}: text differs`);
  });
  const ids = new Set(together.map((x) => x.completion.id));
  assert.equal(ids.size, 16, "request ids are not unique");
  await waitIdle(gen);
});

// ---- 9. Shutdown ----------------------------------------------------------------------------------
t("SIGTERM: in-flight stream finishes, watchers see NOT_SERVING; both servers exit 0", async () => {
  const statuses = [];
  const call = health.Watch({ service: "" }, new grpc.Metadata(), dl(BOUND));
  const ended = new Promise((resolve) => {
    call.on("data", (m) => statuses.push(m.status));
    call.on("error", (e) => resolve(e.code));
    call.on("status", (s) => resolve(s.code));
  });
  const waitFor = async (cond, what) => {
    const until = Date.now() + BOUND;
    while (!cond()) {
      assert.ok(Date.now() < until, `not reached within ${BOUND} ms: ${what}`);
      await sleep(5);
    }
  };
  await waitFor(() => statuses.length, "the watcher's first status");
  assert.deepEqual(statuses, ["SERVING"]);

  // SIGTERM while a stream runs (held at its first token): it gets the grace period to finish
  open.hold(1);
  let signalled = false;
  let streamEnd = 0;
  let openEnd = 0;
  const inflight = stream(gen, GREEDY("Finish me during the grace period", 200), {
    onData: () => {
      if (!signalled) {
        signalled = true;
        open.term();
      }
    },
  }).then((x) => streamResult(x.events), (e) => e).finally(() => (streamEnd = Date.now()));
  await waitFor(() => signalled, "the in-flight stream's first token");
  await waitFor(() => statuses.includes("NOT_SERVING"), "NOT_SERVING on the watch after SIGTERM");
  assert.equal(streamEnd, 0, "the held stream ended before its release");
  open.release();
  const [eo, ea, fl] = await Promise.all([open.stop(BOUND).then((x) => ((openEnd = Date.now()), x)),
                                          authed.stop(BOUND), inflight]);
  const took = openEnd - streamEnd;
  let timer;
  await Promise.race([ended, new Promise((r) => (timer = setTimeout(r, BOUND)))]);
  clearTimeout(timer);
  assert.deepEqual(eo, { code: 0, signal: null }, `open server: ${JSON.stringify(eo)} after ${took} ms`);
  assert.deepEqual(ea, { code: 0, signal: null }, `auth server: ${JSON.stringify(ea)} after ${took} ms`);
  assert.ok(!(fl instanceof Error), `the in-flight stream was cut at shutdown: ${fl.code} ${fl.details}`);
  assert.equal(fl.completion.finish_reason, "LENGTH");
  assert.equal(fl.ids.length, 200);
  // nothing is left in flight once the stream has finished: no need to sit out the grace period
  assert.ok(took < open.grace * 1000 / 2,
            `the server took ${took} ms to exit after its last stream ended (grace is ${open.grace} s)`);
  call.cancel();
});
