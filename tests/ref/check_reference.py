#!/usr/bin/python3
"""Compare the kvserve engine against the independent float64 numpy reference (ref_llama.py).

  check_reference.py --kvserve build/kvserve --model DIR [--n-prompt 20] [--n-gen 64]
                     [--seed 1234] [--tol 1e-4] [--keep] [--weights f32|bf16] [--kv f32|f16]

Checks:
  1. logits: `kvserve logits --model DIR --ids "..." --out FILE` writes float32 LE
     [n_tokens][vocab]; relative error max|diff| / max|ref| must be <= tol.
  2. greedy: `kvserve generate --model DIR --ids "..." -n N --temperature 0 --ignore-eos
     --print-ids` prints the N generated ids on one stdout line; they must equal the
     reference's greedy continuation (full recompute each step, ties -> lowest id).
Exit status 0 only if every check passes. Last line: `reference: P passed, F failed`.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_llama  # noqa: E402


def run(cmd, timeout):
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return p, time.time() - t0


def show_cmd(cmd):
    return " ".join(("'%s'" % c) if (" " in c or not c) else c for c in cmd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvserve", required=True, help="path to the kvserve binary")
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--engine-model", help="what kvserve loads, if not --model: a GGUF file of the same model "
                    "(--model then holds its values dequantized, tools/gguf_write.py --dequantized)")
    ap.add_argument("--n-prompt", type=int, default=20)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the logits file")
    ap.add_argument("--weights", choices=("f32", "bf16", "q8_0", "q4_k"), default="f32",
                    help="kvserve's weight precision; bf16: the reference rounds the matrices alike; q8_0: "
                         "the reference quantizes the matrices and each product's input as kvserve does; "
                         "q4_k: the matrices as --model holds them (a K-quant GGUF file's dequantized "
                         "twin), each product's input quantized as kvserve does")
    ap.add_argument("--kv", choices=("f32", "f16"), default="f32",
                    help="kvserve's KV precision; f16: the reference rounds keys and values alike")
    a = ap.parse_args(argv)

    passed = failed = 0

    def result(name, ok, msg):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
        print("%s %s: %s" % ("PASS" if ok else "FAIL", name, msg), flush=True)

    t0 = time.time()
    m = ref_llama.LlamaRef(a.model, bf16_matrices=a.weights == "bf16", kv_f16=a.kv == "f16", q8=a.weights == "q8_0",
                            kquant=a.weights == "q4_k")
    wopt = ["--weights", a.weights, "--kv", a.kv]
    rng = np.random.default_rng(a.seed)
    ids = [int(t) for t in rng.integers(3, m.V, size=a.n_prompt)]
    ids_s = " ".join(map(str, ids))
    print("model %s: V=%d H=%d L=%d heads %d/%d hd=%d F=%d tied=%s dtype=%s (loaded %.1fs)"
          % (a.model, m.V, m.H, m.L, m.nh, m.nkv, m.hd, m.F, m.tied,
             m.cfg.get("torch_dtype"), time.time() - t0))
    print("prompt ids (seed %d): %s" % (a.seed, ids_s), flush=True)

    # ---- 1. logits for every position
    tmpdir = tempfile.mkdtemp(prefix="kvref-")
    out = os.path.join(tmpdir, "logits.f32")
    em = a.engine_model or a.model
    if a.engine_model:
        print("kvserve loads %s" % em)
    cmd = [a.kvserve, "logits", "--model", em, "--ids", ids_s, "--out", out] + wopt
    try:
        p, dt = run(cmd, a.timeout)
        if p.returncode != 0:
            result("logits", False, "exit %d: %s\n  cmd: %s\n  stderr: %s"
                   % (p.returncode, "", show_cmd(cmd), p.stderr.decode(errors="replace")[-2000:]))
        else:
            got = np.fromfile(out, dtype="<f4")
            if got.size != len(ids) * m.V:
                result("logits", False, "file has %d floats, expected %d x %d = %d"
                       % (got.size, len(ids), m.V, len(ids) * m.V))
            else:
                got = got.astype(np.float64).reshape(len(ids), m.V)
                t1 = time.time()
                ref = m.forward(ids)
                diff = np.abs(got - ref)
                maxdiff, maxref = float(diff.max()), float(np.abs(ref).max())
                rel = maxdiff / maxref
                pos, tok = np.unravel_index(int(np.argmax(diff)), diff.shape)
                per_pos = diff.max(axis=1) / maxref
                finite = bool(np.isfinite(got).all())
                ok = finite and rel <= a.tol
                flips = int((per_pos > a.tol).sum())
                if a.weights in ("q8_0", "q4_k") and finite and flips <= len(ids) // 4 and rel <= 5e-2:
                    # An activation within float rounding of a half step quantizes to the next
                    # 8-bit value in one of the two (float32 here, float64 there): that position,
                    # and through its keys and values the later ones, move by up to ~2e-2. Most
                    # positions must still be as tight as ever.
                    ok = True
                msg = ("max|diff| %.3e, max|ref| %.3e, relative %.3e (tol %.0e) [worst at pos %d id %d; "
                       "engine %.2fs, ref %.2fs]" % (maxdiff, maxref, rel, a.tol, pos, tok, dt,
                                                     time.time() - t1))
                if a.weights in ("q8_0", "q4_k"):
                    rest = np.sort(per_pos)[:len(ids) - flips]
                    msg += "; %d of %d positions past the tol (a rounding flip of an 8-bit activation), the " \
                           "others within %.1e" % (flips, len(ids), float(rest.max()) if rest.size else 0.0)
                if not finite:
                    msg += "; engine output has NaN/Inf"
                if not ok:
                    msg += "\n  per-position relative error: " + " ".join("%.1e" % e for e in per_pos)
                    am_e, am_r = got.argmax(axis=1), ref.argmax(axis=1)
                    msg += "\n  argmax agree at %d/%d positions" % (int((am_e == am_r).sum()), len(ids))
                result("logits", ok, msg)
    except subprocess.TimeoutExpired:
        result("logits", False, "timed out after %.0fs: %s" % (a.timeout, show_cmd(cmd)))
    finally:
        if a.keep and os.path.exists(out):
            print("  logits kept in %s" % out)
        else:
            if os.path.exists(out):
                os.remove(out)
            os.rmdir(tmpdir)

    # ---- 2. greedy continuation
    cmd = [a.kvserve, "generate", "--model", em, "--ids", ids_s, "-n", str(a.n_gen),
           "--temperature", "0", "--ignore-eos", "--print-ids"] + wopt
    try:
        p, dt = run(cmd, a.timeout)
        if p.returncode != 0:
            result("greedy", False, "exit %d\n  cmd: %s\n  stderr: %s"
                   % (p.returncode, show_cmd(cmd), p.stderr.decode(errors="replace")[-2000:]))
        else:
            lines = [ln for ln in p.stdout.decode(errors="replace").splitlines() if ln.strip()]
            try:
                gen = [int(t) for t in lines[-1].split()] if lines else []
            except ValueError:
                gen = None
            t1 = time.time()
            ref_gen, gaps = m.greedy(ids, a.n_gen)
            tref = time.time() - t1
            if gen is None:
                result("greedy", False, "could not parse stdout: %r" % p.stdout[-500:])
            elif gen == ref_gen:
                result("greedy", True, "%d/%d ids match (min top-2 gap %.3g; engine %.2fs, ref %.2fs)"
                       % (len(gen), a.n_gen, min(gaps) if gaps else 0.0, dt, tref))
            else:
                k = next((i for i in range(min(len(gen), len(ref_gen))) if gen[i] != ref_gen[i]),
                         min(len(gen), len(ref_gen)))
                msg = "got %d ids, expected %d" % (len(gen), a.n_gen)
                if k < min(len(gen), len(ref_gen)):
                    # reference logits at the first mismatch, given the shared prefix
                    lg = m.forward(ids + ref_gen[:k], last_only=True)
                    order = np.argsort(-lg, kind="stable")
                    rank = int(np.nonzero(order == gen[k])[0][0])
                    msg = ("first mismatch at step %d: engine %d, reference %d; reference top-2 gap "
                           "%.4g (top-1 %.4f, top-2 id %d %.4f); engine's id has reference rank %d, "
                           "logit %.4f (%.4g below top-1)%s"
                           % (k, gen[k], ref_gen[k], gaps[k], lg[order[0]], order[1], lg[order[1]],
                              rank, lg[gen[k]], lg[order[0]] - lg[gen[k]],
                              "; NEAR-TIE" if gaps[k] < 1e-4 * np.abs(lg).max() else ""))
                msg += "\n  engine:    " + " ".join(map(str, gen))
                msg += "\n  reference: " + " ".join(map(str, ref_gen))
                # Q8_0: a rounding flip of an 8-bit activation (see the logits check) can move a
                # logit by ~2e-2 of the largest; a later near-tie within that may go either way
                flip_ok = (a.weights in ("q8_0", "q4_k") and len(gen) == len(ref_gen) and k >= a.n_gen // 4
                           and k < len(gen) and gaps[k] <= 2e-2 * abs(float(lg[order[0]])))
                if flip_ok:
                    msg = "Q8_0: %d/%d ids match, then a near-tie within a rounding flip's reach: %s" % (k, a.n_gen, msg)
                result("greedy", flip_ok, msg)
    except subprocess.TimeoutExpired:
        result("greedy", False, "timed out after %.0fs: %s" % (a.timeout, show_cmd(cmd)))

    print("reference: %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
