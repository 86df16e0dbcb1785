#!/usr/bin/env node
// Compare kvserve's chat template rendering with @huggingface/jinja's.
//
//   node template_compare.mjs --kvserve BIN --template NAME=PATH [--template NAME=PATH...]
//                             --conversations FILE [--jobs N] [--verbose]
//
// PATH is a model directory or a tokenizer_config.json, read as kvserve reads it:
// "chat_template" (a string, or a list of {name, template} whose "default" is
// used), else chat_template.jinja beside it; bos_token / eos_token as strings
// or {"content": ...}.
//
// FILE holds {"conversations": [{"name", "context", "expect"?}]}: each context
// ({"messages": [...], "add_generation_prompt": ..., "tools": ...}) is rendered
// by every template twice:
//   reference: new Template(src).render(context), with bos_token, eos_token
//              (when the config has them) and add_generation_prompt (false)
//              filled in where the context has none, as kvserve does;
//   kvserve:   `BIN chat-template PATH --json` with the context on stdin.
// A render matches when both give the same text byte for byte (UTF-8), or both fail.
// A failure raised by the template (raise_exception) must carry the same
// message on both sides; kvserve's own messages start "template line L:C:".
// "expect": {"NAME": "error"} asserts that the reference fails too (the data
// checks itself). One line per template ("qwen3: 31/31"), then
// "chat templates: N passed, M failed"; exit status 1 on any failure.
import { Template } from "@huggingface/jinja";
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

function usage(msg) {
  if (msg) process.stderr.write(`template_compare: ${msg}\n`);
  process.stderr.write(
    "usage: node template_compare.mjs --kvserve BIN --template NAME=PATH [--template NAME=PATH...]\n" +
      "       --conversations FILE [--jobs N] [--verbose]\n",
  );
  process.exit(2);
}

function parseArgs(argv) {
  const o = { templates: [], jobs: 2, verbose: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--kvserve") o.kvserve = val();
    else if (a === "--template") {
      const v = val(), eq = v.indexOf("=");
      if (eq <= 0) usage(`--template wants NAME=PATH, got ${v}`);
      o.templates.push({ name: v.slice(0, eq), path: v.slice(eq + 1) });
    } else if (a === "--conversations") o.conversations = val();
    else if (a === "--jobs") o.jobs = Math.max(1, parseInt(val(), 10) || 1);
    else if (a === "--verbose" || a === "-v") o.verbose = true;
    else if (a === "--help" || a === "-h") usage();
    else usage(`unknown argument ${a}`);
  }
  if (!o.kvserve) usage("--kvserve is required");
  if (!o.templates.length) usage("at least one --template is required");
  if (!o.conversations) usage("--conversations is required");
  return o;
}

const tokenText = (t) => (typeof t === "string" ? t : t && typeof t.content === "string" ? t.content : undefined);

// The template and special tokens of a model directory or tokenizer_config.json.
function loadTemplate(p) {
  const cfgPath = fs.statSync(p).isDirectory() ? path.join(p, "tokenizer_config.json") : p;
  const cfg = JSON.parse(fs.readFileSync(cfgPath, "utf8"));
  let src = cfg.chat_template;
  if (Array.isArray(src)) src = src.find((t) => t.name === "default")?.template;
  else if (src === undefined || src === null) src = fs.readFileSync(path.join(path.dirname(cfgPath), "chat_template.jinja"), "utf8");
  if (typeof src !== "string") throw new Error(`${cfgPath}: no usable chat_template`);
  return { src, bos: tokenText(cfg.bos_token), eos: tokenText(cfg.eos_token) };
}

function reference(tpl, context) {
  const ctx = { ...context };
  if (!("bos_token" in ctx) && tpl.bos !== undefined) ctx.bos_token = tpl.bos;
  if (!("eos_token" in ctx) && tpl.eos !== undefined) ctx.eos_token = tpl.eos;
  if (!("add_generation_prompt" in ctx)) ctx.add_generation_prompt = false;
  try {
    return { text: new Template(tpl.src).render(ctx) };
  } catch (e) {
    return { error: String(e && e.message) };
  }
}

function runKvserve(bin, tplPath, context) {
  return new Promise((resolve) => {
    const child = spawn(bin, ["chat-template", tplPath, "--json"], { stdio: ["pipe", "pipe", "pipe"] });
    const out = [], err = [];
    child.stdout.on("data", (d) => out.push(d));
    child.stderr.on("data", (d) => err.push(d));
    // {"text"} with exit 0 or {"error"} with exit 1, and nothing on stderr (where a sanitizer reports)
    child.on("close", (code, signal) => {
      const stdout = Buffer.concat(out).toString("utf8"), stderr = Buffer.concat(err).toString("utf8").trim();
      let r;
      try {
        r = JSON.parse(stdout);
      } catch {
        r = null;
      }
      const clean = r && !stderr && code === ("text" in r ? 0 : 1);
      resolve(clean ? r : { crash: `exit ${code}${signal ? " signal " + signal : ""}: ${stderr.slice(0, 2000)}` });
    });
    child.stdin.end(JSON.stringify(context));
  });
}

function firstDifference(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  const show = (s) => JSON.stringify(s.slice(Math.max(0, i - 30), i + 50));
  return `at character ${i}:\n      reference ${show(a)}\n      kvserve   ${show(b)}`;
}

// null when they agree, else why not.
function verdict(ref, got, expect) {
  if (expect === "error" && !("error" in ref)) return "the data expects the reference to fail, and it did not";
  if (got.crash) return `kvserve crashed (${got.crash})`;
  if ("text" in ref && "text" in got) { /* as UTF-8 bytes: what Node writes (half a surrogate pair as U+FFFD) */
    const a = Buffer.from(ref.text, "utf8").toString("utf8"), b = got.text;
    return a === b ? null : `texts differ ${firstDifference(a, b)}`;
  }
  if ("error" in ref && "error" in got) {
    const raised = !got.error.startsWith("template line ");
    return !raised || got.error === ref.error ? null : `raised messages differ: reference "${ref.error}", kvserve "${got.error}"`;
  }
  return "text" in ref ? `kvserve failed: ${got.error}` : `kvserve rendered where the reference failed (${ref.error})`;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const { conversations } = JSON.parse(fs.readFileSync(o.conversations, "utf8"));
  const jobs = [];
  for (const t of o.templates) {
    const tpl = loadTemplate(t.path);
    for (const c of conversations) jobs.push({ t, tpl, c });
  }
  const results = new Array(jobs.length);
  let next = 0;
  const worker = async () => {
    while (next < jobs.length) {
      const k = next++, { t, tpl, c } = jobs[k];
      results[k] = { ref: reference(tpl, c.context), got: await runKvserve(o.kvserve, t.path, c.context) };
    }
  };
  await Promise.all(Array.from({ length: o.jobs }, worker));

  let passed = 0, failed = 0;
  const perTemplate = new Map(o.templates.map((t) => [t.name, { ok: 0, n: 0, errors: 0 }]));
  jobs.forEach(({ t, c }, k) => {
    const { ref, got } = results[k];
    const why = verdict(ref, got, c.expect?.[t.name]);
    const s = perTemplate.get(t.name);
    s.n++;
    if ("error" in ref) s.errors++;
    if (why === null) {
      s.ok++;
      passed++;
      if (o.verbose) console.log(`  ok   ${t.name} / ${c.name}${"error" in ref ? " (both fail: " + ref.error.slice(0, 60) + ")" : ""}`);
    } else {
      failed++;
      console.log(`  FAIL ${t.name} / ${c.name}: ${why}`);
    }
  });
  for (const [name, s] of perTemplate) console.log(`${name}: ${s.ok}/${s.n}${s.errors ? ` (${s.errors} refused by both)` : ""}`);
  console.log(`chat templates: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
