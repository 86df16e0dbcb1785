#!/usr/bin/env node
// Compare kvserve's tokenizer with the @huggingface/tokenizers reference.
//
//   node tokenizer_compare.mjs --kvserve BIN --tokenizer PATH [--tokenizer PATH...]
//                              --corpus FILE [--jobs N] [--only I[,J...]] [--verbose]
//   node tokenizer_compare.mjs --reference-only --tokenizer PATH... --corpus FILE [--verbose]
//
// For every tokenizer x sample two checks are counted:
//   encode: `BIN tokenize --tokenizer PATH` fed the sample's raw UTF-8 bytes on
//           stdin must print exactly the reference ids (space-separated, one line),
//           the reference being Tokenizer.encode(text, {add_special_tokens:false}).
//   decode: `BIN tokenize --tokenizer PATH --decode` fed our own ids must print
//           the bytes of the reference's round trip decode(encode(x)) — the
//           original bytes, unless the tokenizer normalizes — and the same bytes as
//           the reference decode of those ids (skip_special_tokens:false,
//           clean_up_tokenization_spaces:false — i.e. the plain decoder, as the
//           Rust tokenizers crate does; transformers' clean-up is a separate,
//           lossy post-step that kvserve must not apply).
// The last line is "tokenizer: N passed, M failed"; exit status 1 on failure.
//
// PATH is a tokenizer.json file or a directory holding one, or OURS=REF: kvserve
// loads OURS (e.g. a GGUF file written from REF) and the reference REF. The reference also
// reads a tokenizer_config.json if one sits beside it: DIR/tokenizer_config.json
// for DIR/tokenizer.json, or X.tokenizer_config.json for X.tokenizer.json.
//
// The corpus is a JSON array of strings (*.json), or a text file whose samples
// are separated by a line holding only "=====" (the line breaks around the
// separator are not part of the samples).
import { Tokenizer } from "@huggingface/tokenizers";
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

function usage(msg) {
  if (msg) process.stderr.write(`tokenizer_compare: ${msg}\n`);
  process.stderr.write(
    "usage: node tokenizer_compare.mjs --kvserve BIN --tokenizer PATH [--tokenizer PATH...] --corpus FILE\n" +
      "       [--jobs N] [--only I,J,...] [--verbose] [--reference-only]\n",
  );
  process.exit(2);
}

function parseArgs(argv) {
  const o = { tokenizers: [], jobs: 2, only: null, verbose: false, referenceOnly: false, timeout: 120, rawSamples: 6 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--kvserve") o.kvserve = val();
    else if (a === "--tokenizer") o.tokenizers.push(val());
    else if (a === "--corpus") o.corpus = val();
    else if (a === "--jobs") o.jobs = Math.max(1, parseInt(val(), 10) || 1);
    else if (a === "--raw-samples") o.rawSamples = Math.max(0, parseInt(val(), 10) || 0);
    else if (a === "--timeout") o.timeout = Math.max(1, parseInt(val(), 10) || 120);
    else if (a === "--only") o.only = new Set(val().split(",").map((x) => parseInt(x, 10)));
    else if (a === "--verbose" || a === "-v") o.verbose = true;
    else if (a === "--reference-only") o.referenceOnly = true;
    else if (a === "--help" || a === "-h") usage();
    else usage(`unknown argument ${a}`);
  }
  if (!o.tokenizers.length) usage("at least one --tokenizer is required");
  if (!o.corpus) usage("--corpus is required");
  if (!o.referenceOnly && !o.kvserve) usage("--kvserve is required (or --reference-only)");
  return o;
}

function loadCorpus(file) {
  const raw = fs.readFileSync(file, "utf8");
  let samples;
  if (file.endsWith(".json")) {
    samples = JSON.parse(raw);
    if (!Array.isArray(samples) || !samples.every((s) => typeof s === "string"))
      throw new Error(`${file}: expected a JSON array of strings`);
  } else {
    samples = raw.split(/\r?\n=====\r?\n/);
  }
  for (const [i, s] of samples.entries()) {
    if (!s.isWellFormed()) throw new Error(`${file}: sample ${i} has a lone surrogate (not valid UTF-8)`);
  }
  return samples;
}

function tokenizerFiles(p) {
  let json = p;
  if (fs.statSync(p).isDirectory()) json = path.join(p, "tokenizer.json");
  let config = null;
  const dir = path.dirname(json);
  const base = path.basename(json);
  const candidates = [];
  if (base === "tokenizer.json") candidates.push(path.join(dir, "tokenizer_config.json"));
  else if (base.endsWith("tokenizer.json")) candidates.push(path.join(dir, base.replace(/tokenizer\.json$/, "tokenizer_config.json")));
  for (const c of candidates) if (fs.existsSync(c)) config = c;
  return { json, config };
}

function loadReference(p) {
  const { json, config } = tokenizerFiles(p);
  const tj = JSON.parse(fs.readFileSync(json, "utf8"));
  const tc = config ? JSON.parse(fs.readFileSync(config, "utf8")) : {};
  const tok = new Tokenizer(tj, tc);
  return { tok, json, config };
}

// Run BIN with args, feeding `input` (Buffer) on stdin; resolve {code, signal, stdout, stderr}.
function run(bin, args, input, timeoutSec) {
  return new Promise((resolve) => {
    const child = spawn(bin, args, { stdio: ["pipe", "pipe", "pipe"] });
    const out = [];
    const err = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutSec * 1000);
    child.stdout.on("data", (d) => out.push(d));
    child.stderr.on("data", (d) => err.push(d));
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ code: -1, signal: null, stdout: Buffer.alloc(0), stderr: Buffer.from(String(e)), timedOut });
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr: Buffer.concat(err), timedOut });
    });
    child.stdin.on("error", () => {}); // EPIPE if the child exits early; reported via exit status
    child.stdin.end(input);
  });
}

// Limited-concurrency map.
async function pool(items, jobs, fn) {
  const results = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(jobs, items.length) }, worker));
  return results;
}

const show = (s, max = 120) => {
  const j = JSON.stringify(s);
  return j.length > max ? j.slice(0, max) + "…" : j;
};

function describeProc(r) {
  const what = r.timedOut ? "timed out" : r.signal ? `killed by ${r.signal}` : `exit ${r.code}`;
  const err = r.stderr.toString("utf8").trim();
  return err ? `${what}: ${show(err, 400)}` : what;
}

function parseIds(buf) {
  const s = buf.toString("utf8").trim();
  if (s === "") return [];
  const parts = s.split(/\s+/);
  const ids = parts.map((x) => (/^\d+$/.test(x) ? Number(x) : NaN));
  return ids.some(Number.isNaN) ? null : ids;
}

function tokStr(tok, id) {
  const t = tok.id_to_token(id);
  return t === undefined ? "<?>" : JSON.stringify(t);
}

function window(tok, ids, at, before = 3, after = 4) {
  const lo = Math.max(0, at - before);
  const hi = Math.min(ids.length, at + after);
  const parts = [];
  for (let k = lo; k < hi; k++) parts.push(`${k === at ? ">" : ""}${ids[k]}:${tokStr(tok, ids[k])}`);
  return `${lo > 0 ? "… " : ""}${parts.join(" ")}${hi < ids.length ? " …" : ""}`;
}

function firstDiff(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function firstByteDiff(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

const hexAround = (buf, at) =>
  `${at > 8 ? "…" : ""}${buf.subarray(Math.max(0, at - 8), at + 8).toString("hex").replace(/(..)/g, "$1 ").trim()}`;

function referenceDecode(tok, ids) {
  if (ids.length === 0) return ""; // the JS decode() refuses an empty array
  return tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const samples = loadCorpus(o.corpus);
  const indices = samples.map((_, i) => i).filter((i) => !o.only || o.only.has(i));
  let passed = 0;
  let failed = 0;
  const t0 = Date.now();

  for (const spec of o.tokenizers) {
    // OURS=REF: kvserve loads OURS (a GGUF file's tokenizer), the reference REF (its tokenizer.json)
    const eq = spec.indexOf("=");
    const tpath = eq >= 0 ? spec.slice(0, eq) : spec;
    const { tok, json, config } = loadReference(eq >= 0 ? spec.slice(eq + 1) : spec);
    const label = path.basename(tpath);
    process.stdout.write(`# ${label}: ${json}${config ? ` (+ ${path.basename(config)})` : " (no tokenizer_config.json)"}, ${indices.length} samples\n`);

    const refs = new Map();
    for (const i of indices) {
      const ids = tok.encode(samples[i], { add_special_tokens: false }).ids;
      const bad = ids.findIndex((x) => typeof x !== "number");
      if (bad >= 0) throw new Error(`reference produced a non-id at sample ${i} position ${bad} (token not in vocab?)`);
      refs.set(i, ids);
    }

    if (o.referenceOnly) {
      let tokens = 0;
      for (const i of indices) {
        const ids = refs.get(i);
        tokens += ids.length;
        const dec = referenceDecode(tok, ids);
        const rt = dec === samples[i];
        if (rt) passed++;
        else {
          failed++;
          process.stdout.write(`FAIL ${label} sample ${i} reference round trip: decode(encode(x)) = ${show(dec)} != ${show(samples[i])}\n`);
        }
        if (o.verbose) process.stdout.write(`${label} ${i} [${ids.length}] ${ids.join(" ")}\n`);
      }
      process.stdout.write(`# ${label}: ${tokens} reference tokens\n`);
      continue;
    }

    // Batch mode: one kvserve process encodes every sample (--json) and one
    // decodes every id list; the first rawSamples samples also go through the
    // raw-bytes stdin interface, one process each.
    const batchEnc = new Map(), batchDec = new Map();
    {
      const texts = indices.map((i) => samples[i]);
      const r = await run(o.kvserve, ["tokenize", "--tokenizer", tpath, "--json"], Buffer.from(JSON.stringify(texts), "utf8"), o.timeout);
      if (r.code !== 0 || r.signal || r.timedOut) throw new Error(`batch encode: kvserve ${describeProc(r)}`);
      JSON.parse(r.stdout.toString("utf8")).forEach((ids, k) => batchEnc.set(indices[k], ids));
      const lists = indices.map((i) => batchEnc.get(i));
      const rd = await run(o.kvserve, ["tokenize", "--tokenizer", tpath, "--json", "--decode"], Buffer.from(JSON.stringify(lists), "utf8"), o.timeout);
      if (rd.code !== 0 || rd.signal || rd.timedOut) throw new Error(`batch decode: kvserve ${describeProc(rd)}`);
      JSON.parse(rd.stdout.toString("utf8")).forEach((t, k) => batchDec.set(indices[k], Buffer.from(t, "utf8")));
    }
    const rawSet = new Set(indices.slice(0, o.rawSamples));
    const cached = (buf) => ({ code: 0, signal: null, timedOut: false, stdout: buf, stderr: Buffer.alloc(0) });

    await pool(indices, o.jobs, async (i) => {
      const text = samples[i];
      const input = Buffer.from(text, "utf8");
      const ref = refs.get(i);
      const lines = [];

      // --- encode
      const r = rawSet.has(i)
        ? await run(o.kvserve, ["tokenize", "--tokenizer", tpath], input, o.timeout)
        : cached(Buffer.from(batchEnc.get(i).join(" ") + "\n", "utf8"));
      if (rawSet.has(i) && r.code === 0 && parseIds(r.stdout)?.join(" ") !== batchEnc.get(i).join(" "))
        lines.push(`FAIL ${label} sample ${i} encode: raw stdin mode and --json mode disagree`);
      let ours = null;
      if (r.code !== 0 || r.signal || r.timedOut) {
        lines.push(`FAIL ${label} sample ${i} encode: kvserve ${describeProc(r)}`);
      } else {
        ours = parseIds(r.stdout);
        if (ours === null) {
          lines.push(`FAIL ${label} sample ${i} encode: unparsable output ${show(r.stdout.toString("utf8"))}`);
        } else {
          const d = firstDiff(ref, ours);
          if (d < 0) {
            passed++;
          } else {
            lines.push(
              `FAIL ${label} sample ${i} encode: first difference at token ${d} (ref ${ref.length} tokens, ours ${ours.length}); text ${show(text, 80)}\n` +
                `    ref : ${window(tok, ref, d)}\n` +
                `    ours: ${window(tok, ours, d)}`,
            );
          }
        }
      }
      if (lines.length) failed++;

      // --- decode (round trip of our own ids). A tokenizer that normalizes
      // (NFC, Lowercase, ...) cannot give the input back; its round trip is
      // the reference's own decode(encode(x)).
      const decIds = ours ?? ref;
      const want = Buffer.from(referenceDecode(tok, ref), "utf8");
      const jsDec = Buffer.from(referenceDecode(tok, decIds), "utf8");
      const rd = rawSet.has(i) || !ours
        ? await run(o.kvserve, ["tokenize", "--tokenizer", tpath, "--decode"], Buffer.from(decIds.join(" "), "utf8"), o.timeout)
        : cached(batchDec.get(i));
      const before = lines.length;
      if (rd.code !== 0 || rd.signal || rd.timedOut) {
        lines.push(`FAIL ${label} sample ${i} decode: kvserve ${describeProc(rd)}`);
      } else {
        const got = rd.stdout;
        const d1 = firstByteDiff(want, got);
        if (d1 >= 0)
          lines.push(
            `FAIL ${label} sample ${i} decode: round trip differs at byte ${d1} (want ${want.length} bytes, got ${got.length})${ours ? "" : " [decoding the reference ids]"}\n` +
              `    want: ${hexAround(want, d1)}  ${show(want.toString("utf8"), 80)}\n` +
              `    got : ${hexAround(got, d1)}  ${show(got.toString("utf8"), 80)}`,
          );
        const d2 = firstByteDiff(jsDec, got);
        if (d2 >= 0 && d1 < 0)
          lines.push(
            `FAIL ${label} sample ${i} decode: differs from the reference decode at byte ${d2}\n` +
              `    ref : ${hexAround(jsDec, d2)}\n    got : ${hexAround(got, d2)}`,
          );
      }
      if (lines.length > before) failed++;
      else passed++;

      if (lines.length) process.stdout.write(lines.join("\n") + "\n");
      else if (o.verbose) process.stdout.write(`ok ${label} sample ${i} (${ref.length} tokens)\n`);
    });
  }

  process.stdout.write(`# ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
  process.stdout.write(`tokenizer: ${passed} passed, ${failed} failed\n`);
  process.exitCode = failed ? 1 : 0;
}

main().catch((e) => {
  process.stderr.write(`tokenizer_compare: ${e.stack || e}\n`);
  process.stdout.write("tokenizer: 0 passed, 1 failed\n");
  process.exit(1);
});
