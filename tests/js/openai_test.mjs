#!/usr/bin/env node
// kvserve's OpenAI-compatible HTTP API seen from the official `openai` npm
// package (and curl for the SSE framing, @grpc/grpc-js for the gRPC side).
//
//   node openai_test.mjs --kvserve BIN --model DIR --proto DIR [--verbose]
//
// MODEL must have a chat template (tests/gen_models.sh's tiny-qwen3chat: Qwen 3's
// real template). Tests: /v1/models; completions and chat, streaming and not,
// usage with cached_tokens and stream_options.include_usage; logprobs equal to
// the gRPC Stream's and to the Score RPC and `kvserve score` within 1e-4; 16
// concurrent streams each exactly what it produces alone; a client that
// aborts mid-stream frees its blocks; bad requests (400 naming the field, 404
// for an unknown model or route, 413, 429), 401 without a token, 503 while
// draining; the kvserve extension (agents); metrics by route and code. Every
// wait is bounded and polls an observable state; a request that must still
// be running is held with the test hook. Last line: "openai-node: N passed, M failed".
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";
import OpenAI from "openai";
import { BOUND, KvServer, sleep } from "./kvserver.mjs";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const opt = { verbose: false };
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--kvserve") opt.kvserve = argv[++i];
    else if (a === "--model") opt.model = argv[++i];
    else if (a === "--proto") opt.proto = argv[++i];
    else if (a === "--verbose" || a === "-v") opt.verbose = true;
    else if (a.startsWith("--test")) continue;
    else { process.stderr.write(`openai_test: unknown argument ${a}\n`); process.exit(2); }
  }
  if (!opt.kvserve || !opt.model || !opt.proto) {
    process.stderr.write("usage: node openai_test.mjs --kvserve BIN --model DIR --proto DIR\n");
    process.exit(2);
  }
}
const MODEL = path.basename(opt.model.replace(/\/+$/, ""));
const TOL = 1e-4;

let planned = 0, passed = 0;
function t(name, fn, timeout = 300_000) {
  planned++;
  test(name, { timeout }, async () => {
    await fn();
    passed++;
  });
}
process.on("exit", () => {
  const failed = planned - passed;
  fs.writeSync(1, `openai-node: ${passed} passed, ${failed} failed\n`);
  if (failed) process.exitCode = 1;
});

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "kvserve-openai-"));
const TOKEN = "sk-kvserve-test-1";
fs.writeFileSync(path.join(tmp, "tokens"), `${TOKEN} tenant-a\n`);
const base = { kvserve: opt.kvserve, model: opt.model, proto: opt.proto, tmp, verbose: opt.verbose, http: true };
const mport = 20000 + (process.pid % 20000);
const srv = new KvServer({ ...base, name: "open", extra: ["--metrics", `127.0.0.1:${mport}`] });
const authed = new KvServer({ ...base, name: "auth", extra: ["--token-file", path.join(tmp, "tokens"), "--max-message-bytes", "4096"] });

const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(["kvserve/v1/kvserve.proto"], {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs: [opt.proto] }));
let gen;
const client = (s, apiKey = "unused") => new OpenAI({ baseURL: s.baseURL, apiKey, maxRetries: 0, timeout: BOUND });
let ai;

before(async () => {
  await srv.start();
  await authed.start();
  gen = new pkg.kvserve.v1.Generation(srv.addr, grpc.credentials.createInsecure());
  ai = client(srv);
});
after(async () => {
  gen?.close();
  for (const s of [srv, authed]) {
    s.release();
    const e = await s.stop();
    const marks = ["AddressSanitizer", "LeakSanitizer", "runtime error:", "Segmentation fault"].filter((m) => s.stderr.includes(m));
    if ((e && e.code !== 0) || marks.length) { /* counted as a failed test */
      planned++;
      process.stderr.write(`${s.name} exited ${JSON.stringify(e)}, marks ${marks}\n${s.stderr.slice(-4000)}\n`);
    }
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

const unary = (method, req) => new Promise((resolve, reject) =>
  gen[method](req, new grpc.Metadata(), { deadline: Date.now() + BOUND }, (e, r) => (e ? reject(e) : resolve(r))));
function grpcStream(req) {
  return new Promise((resolve, reject) => {
    const toks = [];
    let comp = null;
    const call = gen.Stream(req, new grpc.Metadata(), { deadline: Date.now() + BOUND });
    call.on("data", (ev) => (ev.event === "token" ? toks.push(ev.token) : (comp = ev.completion)));
    call.on("error", reject);
    call.on("end", () => resolve({ toks, comp }));
  });
}
async function waitIdle() {
  const until = Date.now() + BOUND;
  let st;
  while (Date.now() < until) {
    st = await unary("Stats", {});
    if (st.running === 0 && st.waiting === 0 && st.blocks_used === 0) return st;
    await sleep(20);
  }
  assert.fail(`not idle within ${BOUND} ms: ${JSON.stringify(st)}`);
}
async function waitStats(what, cond) {
  const until = Date.now() + BOUND;
  let st;
  while (Date.now() < until) {
    st = await unary("Stats", {});
    if (cond(st)) return st;
    await sleep(20);
  }
  assert.fail(`${what}: not reached within ${BOUND} ms: ${JSON.stringify(st)}`);
}
async function expectStatus(p, status, check) {
  try {
    await p;
  } catch (e) {
    assert.equal(e.status, status, `status ${e.status} (${e.message}), expected ${status}`);
    if (check) check(e);
    return e;
  }
  assert.fail(`the request succeeded; status ${status} was expected`);
}
async function collectStream(s) {
  const chunks = [];
  for await (const c of s) chunks.push(c);
  return chunks;
}
const textOf = (chunks, kind) =>
  chunks.map((c) => (c.choices[0] ? (kind === "chat" ? c.choices[0].delta.content ?? "" : c.choices[0].text) : "")).join("");

t("GET /v1/models lists the served model", async () => {
  const list = await ai.models.list();
  assert.deepEqual(list.data.map((m) => m.id), [MODEL]);
  assert.equal(list.data[0].object, "model");
  assert.equal((await ai.models.retrieve(MODEL)).id, MODEL);
  await expectStatus(ai.models.retrieve("gpt-4"), 404, (e) => assert.equal(e.code, "model_not_found"));
});

t("completions: one body, and streamed (same text, usage, include_usage)", async () => {
  const req = { model: MODEL, prompt: "The weather today", max_tokens: 12, temperature: 0 };
  const r = await ai.completions.create(req);
  assert.equal(r.object, "text_completion");
  assert.equal(r.choices.length, 1);
  assert.ok(["length", "stop"].includes(r.choices[0].finish_reason));
  assert.ok(r.usage.prompt_tokens > 0);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  assert.equal(typeof r.usage.prompt_tokens_details.cached_tokens, "number");
  const chunks = await collectStream(await ai.completions.create({ ...req, stream: true, stream_options: { include_usage: true } }));
  assert.equal(textOf(chunks, "cmpl"), r.choices[0].text);
  const last = chunks[chunks.length - 1];
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, r.usage.completion_tokens);
  assert.equal(chunks[chunks.length - 2].choices[0].finish_reason, r.choices[0].finish_reason);
  // the same request through gRPC gives the same text
  const g = await grpcStream({ prompt: req.prompt, max_tokens: 12, add_special_tokens: true });
  assert.equal(g.comp.text, r.choices[0].text);
});

t("chat: one body and streamed, rendered with the model's template; cached_tokens on a repeat", async () => {
  const messages = [{ role: "system", content: "Be brief." }, { role: "user", content: "Name a colour." }];
  const r = await ai.chat.completions.create({ model: MODEL, messages, max_tokens: 10, temperature: 0 });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices[0].message.role, "assistant");
  const g = await grpcStream({ messages, max_tokens: 10 });
  assert.equal(r.choices[0].message.content, g.comp.text, "the gRPC Stream with the same messages");
  assert.equal(r.usage.prompt_tokens, g.comp.usage.prompt_tokens);
  const s = await collectStream(await ai.chat.completions.create({ model: MODEL, messages, max_tokens: 10, temperature: 0,
                                                                  stream: true, stream_options: { include_usage: true } }));
  assert.equal(s[0].choices[0].delta.role, "assistant");
  assert.equal(textOf(s, "chat"), r.choices[0].message.content);
  assert.ok(s[s.length - 1].usage.prompt_tokens_details.cached_tokens > 0, "the repeated prompt's blocks were reused");
});

t("logprobs: the gRPC Stream's, the Score RPC's and kvserve score's", async () => {
  const ids = [5, 17, 99, 250, 7, 61, 300, 12];
  const r = await ai.completions.create({ model: MODEL, prompt: ids, max_tokens: 6, temperature: 0, logprobs: 3 });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.token_logprobs.length, 6);
  assert.ok(lp.top_logprobs.every((o) => Object.keys(o).length >= 1 && Object.keys(o).length <= 3));
  const g = await grpcStream({ prompt_ids: ids, max_tokens: 6, logprobs: true, top_logprobs: 3 });
  assert.deepEqual(lp.token_logprobs, g.toks.map((x) => x.logprob), "the same path: the same values");
  const gen_ids = g.toks.map((x) => x.token);
  const sc = await unary("Score", { ids: [...ids, ...gen_ids] });
  lp.token_logprobs.forEach((v, i) => assert.ok(Math.abs(v - sc.logprobs[ids.length - 1 + i]) < TOL, `token ${i}`));
  const out = execFileSync(opt.kvserve, ["score", "--model", opt.model, "--ids", [...ids, ...gen_ids].join(" ")],
                           { encoding: "utf8" });
  const cli = out.split("\n").map((l) => l.trim().split(/\s+/)).filter((f) => /^\d+$/.test(f[0])).map((f) => Number(f[2]));
  lp.token_logprobs.forEach((v, i) => assert.ok(Math.abs(v - cli[ids.length - 1 + i]) < TOL, `cli token ${i}`));
  // chat: logprobs.content with top_logprobs
  const c = await ai.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: "hi" }], max_tokens: 4,
                                              temperature: 0, logprobs: true, top_logprobs: 2 });
  const content = c.choices[0].logprobs.content;
  assert.equal(content.length, c.usage.completion_tokens);
  for (const e of content) {
    assert.equal(e.top_logprobs.length, 2);
    assert.equal(e.top_logprobs[0].logprob, e.logprob, "greedy: the chosen token is the most probable");
    assert.ok(Array.isArray(e.bytes));
  }
});

t("16 concurrent streams each produce exactly what they produce alone", async () => {
  const reqs = Array.from({ length: 16 }, (_, i) => ({ model: MODEL, prompt: `Story ${i}: once`, max_tokens: 16,
                                                       temperature: i % 2 ? 0.8 : 0, seed: 1000 + i }));
  const alone = [];
  for (const q of reqs) alone.push((await ai.completions.create(q)).choices[0].text);
  const together = await Promise.all(reqs.map(async (q) => textOf(await collectStream(await ai.completions.create({ ...q, stream: true })), "cmpl")));
  assert.deepEqual(together, alone);
});

t("a client that aborts mid-stream cancels its request: every block is free again", async () => {
  await waitIdle();
  srv.hold(3);
  try {
    const ac = new AbortController();
    const s = await ai.completions.create({ model: MODEL, prompt: "abort me", max_tokens: 200, temperature: 0, stream: true },
                                          { signal: ac.signal });
    let n = 0;
    try { /* (the SDK ends the iteration or throws an abort error: either way the connection is gone) */
      for await (const c of s) {
        if (c.choices[0]?.text !== undefined && ++n === 2) ac.abort();
      }
    } catch (e) {
      assert.match(String(e.name || e), /Abort/, String(e));
    }
    assert.equal(n, 2, "two chunks before the abort");
    await waitStats("the aborted request cancelled, its blocks free", (st) => st.running === 0 && st.blocks_used === 0);
  } finally {
    srv.release();
  }
  await waitIdle();
});

t("bad requests: 400 naming the field, 404 for a model or route, OpenAI's error shape", async () => {
  const bad = [
    [{ model: MODEL, prompt: "x", max_tokens: -1 }, "max_tokens"],
    [{ model: MODEL, prompt: "x", temperature: 5 }, "temperature"],
    [{ model: MODEL, prompt: "x", n: 2 }, "n"],
    [{ model: MODEL, prompt: "x", logprobs: 9 }, "logprobs"],
    [{ model: MODEL, prompt: "x", frequency_penalty: 0.5 }, "frequency_penalty"],
    [{ model: MODEL, prompt: "x", stop: [1, 2] }, "stop"],
    [{ model: MODEL, prompt: "x", max_tokens: 100000 }, "prompt"],
  ];
  for (const [req, param] of bad)
    await expectStatus(ai.completions.create(req), 400, (e) => {
      assert.equal(e.param, param, `${JSON.stringify(req)}: ${e.message}`);
      assert.equal(e.type, "invalid_request_error");
    });
  await expectStatus(ai.chat.completions.create({ model: MODEL, messages: [] }), 400, (e) => assert.equal(e.param, "messages"));
  await expectStatus(ai.chat.completions.create({ model: MODEL, messages: [{ role: "user", content: [{ type: "image_url" }] }] }),
                     400, (e) => assert.match(e.param, /^messages\[0\]\.content/));
  await expectStatus(ai.completions.create({ model: "gpt-4", prompt: "x" }), 404, (e) => assert.equal(e.code, "model_not_found"));
  const r = await fetch(`${srv.baseURL}/nothing-here`, { method: "POST", body: "{}" });
  assert.equal(r.status, 404);
  assert.equal((await r.json()).error.code, "unknown_url");
  const j = await fetch(`${srv.baseURL}/completions`, { method: "POST", body: "{not json" });
  assert.equal(j.status, 400);
  assert.match((await j.json()).error.message, /JSON/);
  await waitIdle();
});

t("auth: 401 without the right bearer token; 413 for a body over --max-message-bytes", async () => {
  const req = { model: MODEL, prompt: "hello", max_tokens: 2 };
  await expectStatus(client(authed, "wrong").completions.create(req), 401, (e) => assert.equal(e.type, "authentication_error"));
  await expectStatus(client(authed, "wrong").models.list(), 401);
  const ok = await client(authed, TOKEN).completions.create(req);
  assert.equal(ok.choices.length, 1);
  await expectStatus(client(authed, TOKEN).completions.create({ ...req, prompt: "x".repeat(5000) }), 413);
});

t("429 when the queue is full (a held request runs, another waits, --max-queue 1)", async () => {
  const q = new KvServer({ ...base, name: "queue", extra: ["--max-running", "1", "--max-queue", "1"] });
  await q.start();
  const g = new pkg.kvserve.v1.Generation(q.addr, grpc.credentials.createInsecure());
  const stats = () => new Promise((res, rej) => g.Stats({}, new grpc.Metadata(), { deadline: Date.now() + BOUND }, (e, r) => (e ? rej(e) : res(r))));
  try {
    q.hold(0);
    const c = client(q);
    const until = Date.now() + BOUND;
    const reach = async (what, cond) => {
      let st;
      while (Date.now() < until && !cond((st = await stats()))) await sleep(20);
      assert.ok(cond(st), `${what}: ${JSON.stringify(st)}`);
    };
    const held = [c.completions.create({ model: MODEL, prompt: "one", max_tokens: 4 })];
    await reach("the first request running", (st) => st.running === 1);
    held.push(c.completions.create({ model: MODEL, prompt: "two", max_tokens: 4 }));
    await reach("the second one waiting", (st) => st.waiting === 1);
    await expectStatus(c.completions.create({ model: MODEL, prompt: "three", max_tokens: 4 }), 429,
                       (e) => assert.equal(e.type, "rate_limit_error"));
    q.release();
    for (const p of held) assert.equal((await p).choices.length, 1);
  } finally {
    g.close();
    q.release();
    assert.equal((await q.stop()).code, 0);
  }
});

t("503 while draining; the stream in flight completes", async () => {
  const d = new KvServer({ ...base, name: "drain", grace: 60 });
  await d.start();
  const c = client(d);
  d.hold(2);
  const s = await c.completions.create({ model: MODEL, prompt: "drain", max_tokens: 8, temperature: 0, stream: true });
  const it = s[Symbol.asyncIterator]();
  await it.next();
  d.term();
  const until = Date.now() + BOUND;
  let status = 0;
  while (Date.now() < until && status !== 503) {
    const r = await fetch(`${d.baseURL}/completions`, { method: "POST", body: JSON.stringify({ model: MODEL, prompt: "late" }) }).catch(() => null);
    status = r ? r.status : 0;
    if (r) await r.text();
    if (status !== 503) await sleep(20);
  }
  assert.equal(status, 503);
  d.release();
  let text = "", fin = null;
  for (let x = await it.next(); !x.done; x = await it.next()) {
    text += x.value.choices[0]?.text ?? "";
    fin = x.value.choices[0]?.finish_reason ?? fin;
  }
  assert.equal(fin, "length");
  assert.equal((await d.exited).code, 0);
});

t("kvserve extension: an agent's second turn prefills only its new tokens", async () => {
  const ext = { kvserve: { agent_id: "http-agent" } };
  const a = await ai.completions.create({ model: MODEL, prompt: "First turn of the agent", max_tokens: 4, temperature: 0, ...ext });
  const b = await ai.completions.create({ model: MODEL, prompt: " and then", max_tokens: 4, temperature: 0, ...ext });
  assert.equal(b.usage.prompt_tokens_details.cached_tokens, a.usage.prompt_tokens + a.usage.completion_tokens - 1);
  await expectStatus(ai.completions.create({ model: MODEL, prompt: "x", kvserve: { cache: "sometimes" } }), 400,
                     (e) => assert.equal(e.param, "kvserve.cache"));
});

t("curl: SSE framing (event-stream, data: lines, blank-line separated, [DONE])", async () => {
  const out = execFileSync("curl", ["-sN", "-D", "-", "-H", "Content-Type: application/json", `${srv.baseURL}/chat/completions`,
    "-d", JSON.stringify({ model: MODEL, messages: [{ role: "user", content: "hi" }], max_tokens: 5, stream: true })], { encoding: "utf8" });
  const [head, body] = out.split("\r\n\r\n");
  assert.match(head, /^HTTP\/1\.1 200/);
  assert.match(head, /content-type: text\/event-stream/i);
  const events = body.split("\n\n").filter((x) => x.length);
  assert.ok(events.every((e) => e.startsWith("data: ")), body);
  assert.equal(events[events.length - 1], "data: [DONE]");
  for (const e of events.slice(0, -1)) assert.equal(JSON.parse(e.slice(6)).object, "chat.completion.chunk");
});

t("metrics: HTTP requests by route and code", async () => {
  const text = await (await fetch(`http://127.0.0.1:${mport}/metrics`)).text();
  const n = (route, code) => Number((text.match(new RegExp(`kvserve_http_requests_total\\{route="${route}",code="${code}"\\} (\\d+)`)) || [])[1] || 0);
  assert.ok(n("/v1/completions", 200) >= 10, text.split("\n").filter((l) => l.includes("http")).join("\n"));
  assert.ok(n("/v1/chat/completions", 200) >= 2);
  assert.ok(n("/v1/completions", 400) >= 5);
  assert.ok(n("/v1/models", 200) >= 1);
});
