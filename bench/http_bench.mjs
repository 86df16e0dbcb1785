#!/usr/bin/env node
// The HTTP API against gRPC on the same workload: generated tokens per second
// through POST /v1/completions with stream: true (fetch, SSE parsed) and
// through kvserve.v1 Stream (@grpc/grpc-js), at 1 and 16 concurrent streams,
// and the time to the first token. One kvserve serves both; runs alternate
// HTTP / gRPC, --reps times each, and the medians are reported with their ratio.
//
//   node bench/http_bench.mjs --kvserve build/kvserve --model build/models/smollm2-135m
//        [--threads 2] [--tokens 64] [--prompt 32] [--requests 32] [--reps 3]
//
// Needs tests/js/node_modules (bash scripts/install-deps.sh installs it).
import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const js = path.join(here, "..", "tests", "js");
const require = createRequire(path.join(js, "package.json"));
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { KvServer } = await import(path.join(js, "kvserver.mjs"));

const o = { threads: 2, tokens: 64, prompt: 32, requests: 32, reps: 3, proto: path.join(here, "..", "proto") };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const k = argv[i].replace(/^--/, "");
  o[k] = ["kvserve", "model", "proto"].includes(k) ? argv[++i] : Number(argv[++i]);
}
if (!o.kvserve || !o.model) {
  console.error("usage: node bench/http_bench.mjs --kvserve BIN --model DIR [--threads N] [--tokens N] [--prompt N] [--requests N] [--reps N]");
  process.exit(2);
}
const MODEL = path.basename(o.model.replace(/\/+$/, ""));
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "kvserve-http-bench-"));
const srv = new KvServer({ kvserve: o.kvserve, model: o.model, proto: o.proto, tmp, threads: o.threads, http: true, name: "bench",
                           extra: ["--max-running", "64"] });
await srv.start();
const pkg = grpc.loadPackageDefinition(protoLoader.loadSync(["kvserve/v1/kvserve.proto"],
  { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs: [o.proto] }));
const gen = new pkg.kvserve.v1.Generation(srv.addr, grpc.credentials.createInsecure());

let seed = 12345;
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
const prompt = () => Array.from({ length: o.prompt }, () => 3 + Math.floor(rand() * 1000));

/** One streamed request: { tokens, ttft } (seconds). */
async function viaHttp(ids) {
  const t0 = performance.now();
  const r = await fetch(`${srv.baseURL}/completions`, { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: MODEL, prompt: ids, max_tokens: o.tokens, temperature: 0, stream: true,
                           kvserve: { ignore_eos: true, cache: "bypass" } }) });
  let ttft = 0, n = 0, buf = "";
  const dec = new TextDecoder();
  for await (const chunk of r.body) {
    buf += dec.decode(chunk, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!ev.startsWith("data: ") || ev === "data: [DONE]") continue;
      const c = JSON.parse(ev.slice(6));
      if (c.choices?.[0] && c.choices[0].finish_reason === null) {
        if (!n++) ttft = (performance.now() - t0) / 1000;
      }
    }
  }
  return { tokens: n, ttft };
}

function viaGrpc(ids) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let ttft = 0, n = 0;
    const call = gen.Stream({ prompt_ids: ids, max_tokens: o.tokens, ignore_eos: true, cache: { mode: "BYPASS" } },
                            new grpc.Metadata(), { deadline: Date.now() + 600_000 });
    call.on("data", (ev) => {
      if (ev.event === "token" && !n++) ttft = (performance.now() - t0) / 1000;
    });
    call.on("error", reject);
    call.on("end", () => resolve({ tokens: n, ttft }));
  });
}

async function run(fn, conc) {
  const prompts = Array.from({ length: o.requests }, prompt);
  let next = 0, tokens = 0;
  const ttfts = [];
  const t0 = performance.now();
  await Promise.all(Array.from({ length: conc }, async () => {
    while (next < prompts.length) {
      const r = await fn(prompts[next++]);
      tokens += r.tokens;
      ttfts.push(r.ttft);
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  ttfts.sort((a, b) => a - b);
  return { tps: tokens / secs, ttft50: ttfts[Math.floor(ttfts.length / 2)], tokens };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`model ${o.model}, ${o.threads} threads, ${o.requests} requests of ${o.prompt} prompt ids + ${o.tokens} tokens, ` +
            `${o.reps} alternating reps; ${os.cpus().length} CPUs: ${os.cpus()[0].model}`);
await run(viaHttp, 4); // warm-up
await run(viaGrpc, 4);
console.log("\n| streams | HTTP tok/s | gRPC tok/s | HTTP/gRPC | HTTP TTFT p50 ms | gRPC TTFT p50 ms |\n|---|---|---|---|---|---|");
for (const conc of [1, 16]) {
  const h = [], g = [];
  for (let r = 0; r < o.reps; r++) {
    h.push(await run(viaHttp, conc));
    g.push(await run(viaGrpc, conc));
  }
  const ht = median(h.map((x) => x.tps)), gt = median(g.map((x) => x.tps));
  console.log(`| ${conc} | ${ht.toFixed(1)} | ${gt.toFixed(1)} | ${(ht / gt).toFixed(3)} | ` +
              `${(median(h.map((x) => x.ttft50)) * 1000).toFixed(1)} | ${(median(g.map((x) => x.ttft50)) * 1000).toFixed(1)} |`);
}
gen.close();
await srv.stop();
fs.rmSync(tmp, { recursive: true, force: true });
