#!/usr/bin/env node
// llamacpp_bench.mjs: llama.cpp's CPU backend (through node-llama-cpp's prebuilt
// linux-x64 libraries) measured in llama-bench's and llama-batched-bench's terms,
// for bench/vs_llamacpp.sh.
//
//   node llamacpp_bench.mjs --model FILE.gguf [--threads 2] [--reps 5]
//        [--tests pp128,pp512,tg64,b16] [--fa auto|on|off] [--kv f16|f32] [--seed N]
//   node llamacpp_bench.mjs --model FILE.gguf --kvserve-weights
//        (prints the kvserve --weights names that match the file's matrices, then exits)
//
// Tests (each: one warm-up run, then --reps timed runs; mean, sd and best in tokens/s):
//   ppN   one sequence, N random prompt ids decoded by llama_decode calls of at most 512
//         (llama-bench's default micro-batch; one call for N <= 512), logits of the last
//         position only; t/s = N / time of those calls.
//   tg64  a 1-token prompt, a greedy token sampled from it, then 64 steps of (decode the
//         last token, sample the next greedily); only the 64 steps are timed; t/s = 64 / time.
//   b16   16 sequences in one context: each its own 128 random prompt ids (prefilled in
//         batches of 512 tokens, untimed), a greedy first token each, then 64 steps, each
//         one llama_decode of 16 tokens (one per sequence) and 16 greedy samples; only the
//         64 steps are timed; S_TG = 16 * 64 / time (llama-batched-bench's S_TG for
//         -npp 128 -ntg 64 -npl 16, which decodes the same 64 steps).
// Random ids come from a fixed xorshift32 sequence and skip end-of-generation ids;
// generation never stops on EOS (every step is decoded whatever token came out).
//
// Evaluation goes straight to node-llama-cpp's native addon context (initBatch /
// addToBatch / decodeBatch / sampleToken: one N-API call per llama_decode and one per
// sampled token), not through LlamaContext's JS batching queue. Before and after each
// timed run the context's llama.cpp performance counters are printed and reset
// (llama_perf_context_print), so each test also reports the JS wall time of its timed
// region against llama.cpp's own decode time for the same calls: the difference is what
// the binding and the sampling add.
//
// Settings: each test opens its own context (ppN and tg64: one sequence of at least 1024
// cells; b16: 16 sequences of 256 cells each, not a unified KV buffer), n_batch = n_ubatch
// = 512, n_threads = n_threads_batch = --threads, KV cache F16 (llama.cpp's default; --kv
// f32 for kvserve's), flash attention "auto" (llama.cpp's default; it resolves to enabled
// on the CPU, and the context's log line saying so is printed). node-llama-cpp attaches no
// persistent ggml threadpool, so each llama_decode starts and joins its worker threads
// (llama-bench attaches one); that cost falls inside llama.cpp's own timer.
//
// Internal names used (pinned to node-llama-cpp 3.22.1 by package-lock.json):
// Llama._bindings (the addon), LlamaModel._model (the addon model).
import fs from "node:fs";
import path from "node:path";
import {getLlama, LlamaLogLevel, readGgufFileInfo} from "node-llama-cpp";

const USAGE = `usage: node llamacpp_bench.mjs --model FILE.gguf [--threads 2] [--reps 5]
         [--tests pp128,pp512,tg64,b16] [--fa auto|on|off] [--kv f16|f32] [--seed N]
       node llamacpp_bench.mjs --model FILE.gguf --kvserve-weights`;

function parseArgs(argv) {
    const o = {model: null, threads: 2, reps: 5, tests: "pp128,pp512,tg64,b16", fa: "auto", kv: "f16",
        seed: 2463534242, kvserveWeights: false};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i], v = argv[i + 1];
        const need = () => { if (v === undefined) fail(`${a} needs a value`); i++; return v; };
        if (a === "--model") o.model = need();
        else if (a === "--threads") o.threads = Number(need());
        else if (a === "--reps") o.reps = Number(need());
        else if (a === "--tests") o.tests = need();
        else if (a === "--fa") o.fa = need();
        else if (a === "--kv") o.kv = need();
        else if (a === "--seed") o.seed = Number(need());
        else if (a === "--kvserve-weights") o.kvserveWeights = true;
        else if (a === "-h" || a === "--help") { console.log(USAGE); process.exit(0); }
        else fail(`unknown argument ${a}`);
    }
    if (!o.model) fail("--model is required");
    if (!Number.isInteger(o.threads) || o.threads < 1) fail("--threads must be a positive integer");
    if (!Number.isInteger(o.reps) || o.reps < 1) fail("--reps must be a positive integer");
    if (!["auto", "on", "off"].includes(o.fa)) fail("--fa must be auto, on or off");
    if (!["f16", "f32"].includes(o.kv)) fail("--kv must be f16 or f32");
    if (!Number.isInteger(o.seed) || o.seed <= 0 || o.seed >= 2 ** 32) fail("--seed must be in 1 .. 2^32-1");
    o.testList = o.tests.split(",").map((t) => t.trim()).filter(Boolean);
    for (const t of o.testList)
        if (!/^pp[1-9][0-9]*$/.test(t) && t !== "tg64" && t !== "b16") fail(`unknown test ${t} (ppN, tg64, b16)`);
    return o;
}

function fail(msg) {
    console.error(`llamacpp_bench: ${msg}\n${USAGE}`);
    process.exit(2);
}

// ---- GGUF tensor types -> the kvserve weight format that holds the same matrices ----

// ggml type ids (ggml.h): the ones tools/gguf_write.py writes.
const GGML_TYPE_NAME = {0: "F32", 1: "F16", 2: "Q4_0", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K", 30: "BF16"};

// The file's weight matrices (2-D tensors except the embedding table) by type, in
// elements; then the kvserve format that keeps them closest to how llama.cpp holds them.
async function kvserveWeightsFor(file) {
    const info = await readGgufFileInfo(file, {readTensorInfo: true, logWarnings: false,
        ignoreKeys: ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores"]});
    const elems = {};
    for (const t of info.tensorInfo ?? []) {
        if (t.dimensions.length !== 2 || t.name === "token_embd.weight") continue;
        const n = t.dimensions.reduce((a, d) => a * Number(d), 1);
        const name = GGML_TYPE_NAME[t.ggmlType] ?? `type${t.ggmlType}`;
        elems[name] = (elems[name] ?? 0) + n;
    }
    const types = Object.keys(elems).sort((a, b) => elems[b] - elems[a]);
    if (types.length === 0) throw new Error(`${file}: no 2-D weight tensors`);
    let engine, batch;
    if (elems.Q4_K || elems.Q6_K) [engine, batch] = ["q4k", "q4_k"];    // K-quants run in their own blocks
    else if (types[0] === "Q8_0" || types[0] === "Q4_0") [engine, batch] = ["q8", "q8_0"]; // Q4_0: nearest kvserve format
    else if (types[0] === "BF16" || types[0] === "F16") [engine, batch] = ["bf16", "bf16"]; // 2 bytes a weight
    else if (types[0] === "F32") [engine, batch] = ["f32", "f32"];
    else throw new Error(`${file}: no kvserve weight format for ${types[0]}`);
    const mix = types.map((t) => `${t} ${(100 * elems[t] / types.reduce((a, u) => a + elems[u], 0)).toFixed(0)}%`);
    return {engine, batch, mix: mix.join(", ")};
}

// ---- build identity: llama.cpp's commit and build number, read from libllama-common.so ----

// The value of an exported data symbol of a mapped x86-64 ELF shared object: an int32
// ("int") or the C string a pointer points to ("str"). The pointer's link-time value
// is read from the file (GNU ld stores it in place for R_X86_64_RELATIVE; if it is 0,
// the relocation's addend is used).
function elfSymbols(file, wanted) {
    const b = fs.readFileSync(file);
    if (b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1) return {};
    const phoff = Number(b.readBigUInt64LE(0x20)), shoff = Number(b.readBigUInt64LE(0x28));
    const phentsize = b.readUInt16LE(0x36), phnum = b.readUInt16LE(0x38);
    const shentsize = b.readUInt16LE(0x3a), shnum = b.readUInt16LE(0x3c);
    const loads = [];
    for (let i = 0; i < phnum; i++) {
        const p = phoff + i * phentsize;
        if (b.readUInt32LE(p) === 1)
            loads.push({off: Number(b.readBigUInt64LE(p + 8)), va: Number(b.readBigUInt64LE(p + 16)),
                size: Number(b.readBigUInt64LE(p + 32))});
    }
    const toOff = (va) => {
        for (const s of loads) if (va >= s.va && va < s.va + s.size) return va - s.va + s.off;
        return -1;
    };
    const sec = (i) => {
        const s = shoff + i * shentsize;
        return {type: b.readUInt32LE(s + 4), off: Number(b.readBigUInt64LE(s + 24)),
            size: Number(b.readBigUInt64LE(s + 32)), link: b.readUInt32LE(s + 40)};
    };
    const sections = Array.from({length: shnum}, (_, i) => sec(i));
    const cstr = (off) => (off < 0 ? null : b.toString("latin1", off, b.indexOf(0, off)));
    const relative = new Map(); // R_X86_64_RELATIVE: address -> addend
    for (const s of sections)
        if (s.type === 4) // SHT_RELA
            for (let p = s.off; p + 24 <= s.off + s.size; p += 24)
                if (Number(b.readBigUInt64LE(p + 8) & 0xffffffffn) === 8)
                    relative.set(Number(b.readBigUInt64LE(p)), Number(b.readBigInt64LE(p + 16)));
    const out = {};
    for (const s of sections) {
        if (s.type !== 11) continue; // SHT_DYNSYM
        const strtab = sections[s.link];
        for (let p = s.off; p + 24 <= s.off + s.size; p += 24) {
            const name = cstr(strtab.off + b.readUInt32LE(p));
            if (!(name in wanted)) continue;
            const va = Number(b.readBigUInt64LE(p + 8)), off = toOff(va);
            if (off < 0) continue;
            if (wanted[name] === "int") out[name] = b.readInt32LE(off);
            else {
                let target = Number(b.readBigUInt64LE(off));
                if (target === 0) target = relative.get(va) ?? 0;
                out[name] = target ? cstr(toOff(target)) : null;
            }
        }
    }
    return out;
}

// The shared objects of this process whose file names match re.
function mappedLibraries(re) {
    const libs = new Set();
    for (const line of fs.readFileSync("/proc/self/maps", "utf8").split("\n")) {
        const f = line.split(/\s+/).slice(5).join(" ");
        if (f && re.test(path.basename(f))) libs.add(f);
    }
    return [...libs];
}

// ---- statistics and random ids ----

function stats(xs) {
    const n = xs.length, mean = xs.reduce((a, x) => a + x, 0) / n;
    const sd = n > 1 ? Math.sqrt(xs.reduce((a, x) => a + (x - mean) ** 2, 0) / (n - 1)) : 0;
    return {mean, sd, best: Math.max(...xs)};
}

// xorshift32 (Marsaglia): the same ids for the same seed on every run.
function makeRng(seed) {
    let x = seed >>> 0;
    return () => {
        x ^= x << 13; x >>>= 0;
        x ^= x >>> 17;
        x ^= x << 5; x >>>= 0;
        return x;
    };
}

// ---- llama.cpp's own timings ----

// Captured llama.cpp log text (the logger below appends to it).
let logText = "";
const logLines = [];

function onLog(level, message) {
    logLines.push(`[${level}] ${message}`);
    if (logLines.length > 2000) logLines.splice(0, 1000);
    logText += message + "\n";
}

const sleepTick = () => new Promise((r) => setImmediate(r));

// Print and reset the context's performance counters; returns llama.cpp's own decode
// time since the previous call (prompt eval + eval, ms) and its token counts. The log
// lines arrive asynchronously (a thread-safe function), so wait for the last one.
async function llamaPerf(ctx) {
    logText = "";
    ctx.printTimings();
    for (let i = 0; i < 2000 && !/total time\s*=.*\n/.test(logText); i++) await sleepTick();
    const num = (re) => { const m = logText.match(re); return m ? [Number(m[1]), Number(m[2])] : [0, 0]; };
    const [pMs, pTok] = num(/prompt eval time\s*=\s*([\d.]+) ms \/\s*(\d+) tokens/);
    const [eMs, eRuns] = num(/\beval time\s*=\s*([\d.]+) ms \/\s*(\d+) runs/);
    const seen = /total time/.test(logText);
    logText = "";
    return {seen, ms: pMs + eMs, promptMs: pMs, promptTokens: pTok, evalMs: eMs, evalRuns: eRuns};
}

// ---- the tests ----

class Bench {
    constructor(llama, model, opts) {
        this.llama = llama;
        this.model = model;
        this.opts = opts;
        this.B = llama._bindings;
        this.addonModel = model._model;
        const md = model.fileInfo.metadata;
        this.nVocab = md?.tokenizer?.ggml?.tokens?.length ?? md?.[md?.general?.architecture]?.vocab_size;
        if (!Number.isInteger(this.nVocab) || this.nVocab < 2) throw new Error("cannot tell the vocabulary size");
        this.rng = makeRng(opts.seed);
    }

    randomIds(n) {
        const ids = new Uint32Array(n);
        for (let i = 0; i < n; i++) {
            let t;
            do t = this.rng() % this.nVocab; while (this.model.isEogToken(t));
            ids[i] = t;
        }
        return ids;
    }

    async newContext(sequences, contextSize) {
        const ctx = new this.B.AddonContext(this.addonModel, {
            contextSize, batchSize: 512, sequences, threads: this.opts.threads,
            flashAttention: this.opts.fa === "auto" ? "auto" : this.opts.fa === "on",
            performanceTracking: true,
            kvCacheKeyType: this.opts.kv === "f32" ? 0 : 1, kvCacheValueType: this.opts.kv === "f32" ? 0 : 1
        });
        logText = "";
        if (!(await ctx.init())) throw new Error("llama.cpp could not create the context");
        await new Promise((r) => setTimeout(r, 30)); // the context's log lines arrive asynchronously
        const fa = logText.split("\n").filter((l) => /flash_attn|Flash Attention/i.test(l));
        if (!this.faReported && fa.length) {
            console.log(`llama.cpp context: ${fa.map((l) => l.trim().replace(/\s+/g, " ")).join("; ")}`);
            this.faReported = true;
        }
        return ctx;
    }

    newSampler() {
        const s = new this.B.AddonSampler(this.addonModel);
        s.applyConfig({temperature: 0}); // llama_sampler_init_greedy
        return s;
    }

    // One llama_decode of the tokens of one or more sequences; logits where asked.
    // items: [{seq, pos, ids, logits: Uint32Array of indexes into ids}]; returns the
    // batch logit index of each item's requested positions.
    async decode(ctx, items) {
        let n = 0;
        for (const it of items) n += it.ids.length;
        ctx.initBatch(n);
        const idx = items.map((it) => ctx.addToBatch(it.seq, it.pos, it.ids, it.logits));
        await ctx.decodeBatch();
        return idx;
    }

    async pp(n, reps) {
        const ctx = await this.newContext(1, Math.max(1024, Math.ceil(n / 256) * 256));
        const tps = [], ratio = [];
        const none = new Uint32Array(0);
        for (let k = 0; k <= reps; k++) {
            ctx.disposeSequence(0); // llama_memory_seq_rm(seq 0, all positions)
            const ids = this.randomIds(n);
            await llamaPerf(ctx);
            const t0 = performance.now();
            for (let p = 0; p < n; p += 512) { // llama-bench's micro-batches of 512
                const m = Math.min(512, n - p);
                ctx.initBatch(m);
                ctx.addToBatch(0, p, ids.subarray(p, p + m), p + m === n ? Uint32Array.of(m - 1) : none);
                await ctx.decodeBatch();
            }
            const ms = performance.now() - t0;
            const perf = await llamaPerf(ctx);
            if (k === 0) continue; // warm-up
            tps.push(n / (ms / 1e3));
            if (perf.seen && perf.ms > 0) ratio.push(ms / perf.ms);
        }
        await ctx.dispose();
        return {tps, note: ratio.length ? `JS wall / llama.cpp's own decode time: ${fmtRatio(ratio)}` : ""};
    }

    async tg(ng, reps) {
        const ctx = await this.newContext(1, 1024);
        const sampler = this.newSampler();
        const tps = [], ratio = [], perStep = [];
        const zero = Uint32Array.of(0);
        for (let k = 0; k <= reps; k++) {
            ctx.disposeSequence(0);
            await this.decode(ctx, [{seq: 0, pos: 0, ids: this.randomIds(1), logits: zero}]);
            let next = await ctx.sampleToken(0, sampler);
            await llamaPerf(ctx);
            let decMs = 0;
            const t0 = performance.now();
            for (let i = 0; i < ng; i++) {
                const d0 = performance.now();
                ctx.initBatch(1);
                ctx.addToBatch(0, 1 + i, Uint32Array.of(next), zero);
                await ctx.decodeBatch();
                decMs += performance.now() - d0;
                next = await ctx.sampleToken(0, sampler);
                if (next < 0) throw new Error("the sampler returned no token");
            }
            const ms = performance.now() - t0;
            const perf = await llamaPerf(ctx);
            if (k === 0) continue;
            tps.push(ng / (ms / 1e3));
            if (perf.seen && perf.ms > 0) {
                ratio.push(ms / perf.ms);
                perStep.push({wall: ms / ng, llama: perf.ms / ng, dec: decMs / ng});
            }
        }
        sampler.dispose();
        await ctx.dispose();
        return {tps, note: stepNote(ratio, perStep)};
    }

    async batched(B, npp, ntg, reps) {
        const perSeq = Math.ceil((npp + ntg + 1) / 256) * 256;
        const ctx = await this.newContext(B, B * perSeq);
        const samplers = Array.from({length: B}, () => this.newSampler());
        const tps = [], ratio = [], perStep = [];
        const zero = Uint32Array.of(0), lastPrompt = Uint32Array.of(npp - 1);
        const perBatch = Math.max(1, Math.floor(512 / npp)); // whole prompts per 512-token batch
        for (let k = 0; k <= reps; k++) {
            for (let s = 0; s < B; s++) ctx.disposeSequence(s);
            // untimed prefill: each sequence its own prompt, a greedy first token each
            const next = new Array(B);
            for (let s0 = 0; s0 < B; s0 += perBatch) {
                const seqs = [];
                for (let s = s0; s < Math.min(B, s0 + perBatch); s++) seqs.push(s);
                const idx = await this.decode(ctx, seqs.map((s) => ({seq: s, pos: 0, ids: this.randomIds(npp),
                    logits: lastPrompt})));
                const toks = await Promise.all(seqs.map((s, j) => ctx.sampleToken(idx[j][0], samplers[s])));
                seqs.forEach((s, j) => { next[s] = toks[j]; });
            }
            await llamaPerf(ctx);
            let decMs = 0;
            const t0 = performance.now();
            for (let i = 0; i < ntg; i++) {
                const d0 = performance.now();
                ctx.initBatch(B);
                const idx = new Array(B);
                for (let s = 0; s < B; s++) idx[s] = ctx.addToBatch(s, npp + i, Uint32Array.of(next[s]), zero)[0];
                await ctx.decodeBatch();
                decMs += performance.now() - d0;
                const toks = await Promise.all(idx.map((bi, s) => ctx.sampleToken(bi, samplers[s])));
                for (let s = 0; s < B; s++) {
                    if (toks[s] < 0) throw new Error("the sampler returned no token");
                    next[s] = toks[s];
                }
            }
            const ms = performance.now() - t0;
            const perf = await llamaPerf(ctx);
            if (k === 0) continue;
            tps.push(B * ntg / (ms / 1e3));
            if (perf.seen && perf.ms > 0) {
                ratio.push(ms / perf.ms);
                perStep.push({wall: ms / ntg, llama: perf.ms / ntg, dec: decMs / ntg});
            }
        }
        for (const s of samplers) s.dispose();
        await ctx.dispose();
        return {tps, note: stepNote(ratio, perStep)};
    }
}

function fmtRatio(r) {
    const s = stats(r);
    return `${s.mean.toFixed(4)} (runs ${Math.min(...r).toFixed(4)}-${Math.max(...r).toFixed(4)})`;
}

function stepNote(ratio, perStep) {
    if (!ratio.length) return "llama.cpp's own timings were not reported";
    const m = (f) => perStep.reduce((a, p) => a + f(p), 0) / perStep.length;
    const wall = m((p) => p.wall), llama = m((p) => p.llama), dec = m((p) => p.dec);
    return `JS wall / llama.cpp's own decode time: ${fmtRatio(ratio)}; per step ${wall.toFixed(3)} ms = ` +
        `${llama.toFixed(3)} llama_decode (llama.cpp's timer) + ${(dec - llama).toFixed(3)} binding around it + ` +
        `${(wall - dec).toFixed(3)} greedy sampling (N-API call, worker thread)`;
}

// ---- main ----

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    if (!fs.existsSync(opts.model)) fail(`no such file: ${opts.model}`);

    if (opts.kvserveWeights) {
        const w = await kvserveWeightsFor(opts.model);
        console.log(`engine=${w.engine} batch=${w.batch} matrices="${w.mix}"`);
        return 0;
    }

    // The prebuilt CPU binaries only: no GPU variant, never a source build or download.
    const llama = await getLlama({gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
        progressLogs: false, maxThreads: opts.threads, logLevel: LlamaLogLevel.info, logger: onLog});
    if (llama.gpu !== false || llama.buildType !== "prebuilt")
        throw new Error(`unexpected binary: gpu ${llama.gpu}, build ${llama.buildType}`);

    const nlcVersion = JSON.parse(fs.readFileSync(new URL("../package.json", import.meta.resolve("node-llama-cpp")))).version;
    const rel = llama.llamaCppRelease;
    let build = "";
    const common = mappedLibraries(/^libllama-common\.so/)[0];
    if (common) {
        const s = elfSymbols(common, {LLAMA_COMMIT: "str", LLAMA_BUILD_NUMBER: "int", LLAMA_COMPILER: "str"});
        build = `, commit ${s.LLAMA_COMMIT ?? "?"}, build number ${s.LLAMA_BUILD_NUMBER ?? "?"}, ` +
            `compiler ${s.LLAMA_COMPILER ?? "?"}`;
    }
    console.log(`llama.cpp: ${rel.repo} release ${rel.release}${build} (node-llama-cpp ${nlcVersion}, prebuilt ` +
        `@node-llama-cpp/linux-x64, loaded from ${common ? path.dirname(common) : "?"})`);

    const st = fs.statSync(opts.model);
    let model;
    try {
        model = await llama.loadModel({modelPath: opts.model, gpuLayers: 0});
    } catch (err) {
        await sleepTick();
        console.error(`llamacpp_bench: llama.cpp did not load ${opts.model}: ${err?.message ?? err}`);
        console.error("llama.cpp's log (last 60 lines):\n" + logLines.slice(-60).join("\n"));
        return 1;
    }
    const cpu = mappedLibraries(/^libggml-cpu-.*\.so/);
    const variant = cpu.map((f) => path.basename(f).replace(/^libggml-cpu-|\.so$/g, "")).join(", ") || "?";
    console.log(`ggml CPU backend: ${variant} (${cpu.map((f) => path.basename(f)).join(", ")}); ${llama.systemInfo.trim()}`);
    const nParams = model._model.getTotalParameters?.();
    console.log(`model: ${opts.model}: file ${(st.size / 1e6).toFixed(1)} MB; llama.cpp: ${model.typeDescription}, ` +
        `weights ${(model.size / 1048576).toFixed(1)} MiB, ` +
        `${nParams ? (nParams / 1e6).toFixed(1) + "M parameters, " : ""}` +
        `vocabulary ${model.fileInfo.metadata?.tokenizer?.ggml?.tokens?.length ?? "?"}`);
    console.log(`threads: ${opts.threads} (llama.cpp n_threads = n_threads_batch); batch = micro-batch 512; ` +
        `KV cache ${opts.kv.toUpperCase()}; flash attention ${opts.fa}; reps ${opts.reps} after one warm-up; ` +
        `seed ${opts.seed}`);

    const bench = new Bench(llama, model, opts);
    const rows = [], notes = [];
    for (const t of opts.testList) {
        let r;
        if (t.startsWith("pp")) r = await bench.pp(Number(t.slice(2)), opts.reps);
        else if (t === "tg64") r = await bench.tg(64, opts.reps);
        else r = await bench.batched(16, 128, 64, opts.reps);
        const s = stats(r.tps);
        rows.push(`| ${t.padEnd(5)} | ${s.mean.toFixed(1).padStart(11)} | ${s.sd.toFixed(1).padStart(8)} | ` +
            `${s.best.toFixed(1).padStart(8)} | ${String(r.tps.length).padStart(4)} |`);
        if (r.note) notes.push(`${t}: ${r.note}`);
    }
    console.log("");
    console.log("| test  |    t/s mean |       sd |     best | runs |");
    console.log("|-------|-------------|----------|----------|------|");
    for (const row of rows) console.log(row);
    console.log("");
    for (const n of notes) console.log(n);
    if (opts.testList.includes("b16")) console.log("(b16 is S_TG: 16 sequences x 64 decode steps / time of those steps)");
    await model.dispose();
    await llama.dispose();
    return 0;
}

main().then((rc) => process.exit(rc), (err) => {
    console.error(`llamacpp_bench: ${err?.stack ?? err}`);
    if (logLines.length) console.error("llama.cpp's log (last 30 lines):\n" + logLines.slice(-30).join("\n"));
    process.exit(1);
});
