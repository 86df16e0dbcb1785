// kvserver.mjs — what kvserve's Node tests share: a `kvserve serve` process on
// free loopback ports (gRPC, and with { http: true } the HTTP API too), the
// test hold (KVSERVE_TEST_HOLD_FILE, docs/testing.md), waiting for SERVING
// through grpc.health.v1 with a bound, and SIGTERM with a bound.
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

export const BOUND = 120_000; // ms: the bound on every wait for a state (it only guards against hangs)
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

let Health = null;
function healthClient(protoDir, addr) {
  if (!Health) {
    const def = protoLoader.loadSync(["grpc/health/v1/health.proto"], { keepCase: true, enums: String, includeDirs: [protoDir] });
    Health = grpc.loadPackageDefinition(def).grpc.health.v1.Health;
  }
  return new Health(addr, grpc.credentials.createInsecure());
}

export class KvServer {
  /** o: { kvserve, model, proto, tmp, threads, verbose, name, extra: [], grace: 10, http: false } */
  constructor(o) {
    Object.assign(this, { extra: [], grace: 10, threads: 1, http: false }, o);
    this.stderr = "";
    this.exit = null;
    this.holdFile = path.join(this.tmp, `${this.name}.hold`);
  }
  /** From the next engine step on, no request generates more than n tokens (they stay running). */
  hold(n) {
    fs.writeFileSync(`${this.holdFile}.new`, `${n}\n`);
    fs.renameSync(`${this.holdFile}.new`, this.holdFile); // atomic: the server never reads half a file
  }
  /** Lift the hold: held requests go on. */
  release() {
    fs.rmSync(this.holdFile, { force: true });
  }
  async start() {
    for (let attempt = 0; attempt < 3; attempt++) {
      this.port = await freePort();
      this.addr = `127.0.0.1:${this.port}`;
      const args = ["serve", "--model", this.model, "--listen", this.addr, "--grace", String(this.grace),
                    "--threads", String(this.threads), ...this.extra];
      if (this.http) {
        this.httpPort = await freePort();
        this.baseURL = `http://127.0.0.1:${this.httpPort}/v1`;
        args.push("--http", `127.0.0.1:${this.httpPort}`);
      }
      if (this.verbose) process.stderr.write(`[${this.name}] ${this.kvserve} ${args.join(" ")}\n`);
      this.proc = spawn(this.kvserve, args, {
        stdio: ["ignore", "inherit", "pipe"],
        env: { ...process.env, KVSERVE_TEST_HOLD_FILE: this.holdFile },
      });
      this.stderr = "";
      this.exit = null;
      this.signalled = false;
      this.exited = new Promise((resolve) => {
        this.proc.on("exit", (code, signal) => {
          this.exit = { code, signal };
          resolve(this.exit);
        });
        this.proc.on("error", (e) => {
          this.exit = { code: null, signal: null, error: e };
          resolve(this.exit);
        });
      });
      this.proc.stderr.on("data", (d) => {
        this.stderr += d;
        if (this.verbose) process.stderr.write(`[${this.name}] ${d}`);
      });
      if (await this.waitServing(BOUND)) return;
      if (this.exit && /cannot listen/.test(this.stderr)) continue; // lost the port race: retry
      break;
    }
    throw new Error(`${this.name}: kvserve did not become SERVING on ${this.addr}\n${this.stderr}`);
  }
  async waitServing(limitMs) {
    const h = healthClient(this.proto, this.addr);
    const until = Date.now() + limitMs;
    try {
      while (Date.now() < until && !this.exit) {
        const ok = await new Promise((resolve) =>
          h.Check({ service: "" }, new grpc.Metadata(), { deadline: Date.now() + 2000 }, (err, r) =>
            resolve(!err && r.status === "SERVING")));
        if (ok) return true;
        await sleep(100);
      }
      return false;
    } finally {
      h.close();
    }
  }
  /** Exactly one SIGTERM (a second one is not what is tested here). */
  term() {
    if (!this.signalled && !this.exit) this.proc.kill("SIGTERM");
    this.signalled = true;
  }
  /** SIGTERM; resolves to the exit {code, signal} (bounded: kill -9 after limitMs). */
  async stop(limitMs = 15000) {
    if (!this.proc) return null;
    this.term();
    const timer = setTimeout(() => {
      if (!this.exit) this.proc.kill("SIGKILL");
    }, limitMs);
    const e = await this.exited;
    clearTimeout(timer);
    return e;
  }
}
