#!/usr/bin/python3
"""Chat over gRPC: GenerateRequest.messages rendered with the model's chat template.

    /usr/bin/python3 tests/rpc/test_chat.py --kvserve BUILD/kvserve --model MODELS/tiny --proto proto

The model is MODELS/tiny-qwen3chat: tiny random weights with Qwen 3's real tokenizer.json and
tokenizer_config.json (its chat template, <|im_end|> as end of turn). The expected prompts are
rendered here by Jinja2 (Debian's python3-jinja2, set up as transformers' apply_chat_template
sets it up), an implementation we did not write; kvserve renders in C.

Checks: messages give exactly the tokens of the rendered prompt; an agent continued with the whole
conversation prefills only what follows its history and answers as a fresh request does; a
history that is not a prefix is reported and recomputed; bad messages get INVALID_ARGUMENT naming
the field; a model without a template refuses messages clearly; `kvctl chat` holds a two-turn
conversation on an agent it drops at the end. Harness: tests/rpc/harness.py.
"""
import json
import os
import subprocess
import sys
import unittest

import grpc
import jinja2
import jinja2.sandbox

import harness
from harness import *  # noqa: F401,F403

MODELS = os.path.dirname(ARGS.model)
CHAT_MODEL = os.path.join(MODELS, "tiny-qwen3chat")
KVCTL = os.path.join(os.path.dirname(ARGS.kvserve), "kvctl")


def jinja_render(messages, add_generation_prompt=True):
    """The prompt transformers would render: trim_blocks, lstrip_blocks, raise_exception, tojson."""
    with open(os.path.join(CHAT_MODEL, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    t = env.from_string(cfg["chat_template"])
    return t.render(messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=cfg.get("bos_token") or "", eos_token=cfg.get("eos_token") or "")


def msgs(*pairs):
    return [pb.ChatMessage(role=r, content=c) for r, c in pairs]


def as_dicts(ms):
    return [{"role": m.role, "content": m.content} for m in ms]


CONVERSATIONS = [
    (("user", "Hello!"),),
    (("system", "You are terse."), ("user", "Name three colours.")),
    (("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello. How can I help?"), ("user", "Tell me a joke\nabout cats.")),
    (("user", "Ünïcödé ✓ 日本語 🙂"), ("assistant", ""), ("user", "  spaces around  ")),
]


class Chat(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Server(model=CHAT_MODEL).start()
        cls.c = cls.srv.client()

    @classmethod
    def tearDownClass(cls):
        try:
            cls.srv.stop()
        finally:
            cls.srv.kill()

    def stream(self, req):
        toks, comps = self.c.run_stream(req)
        self.assertEqual(len(comps), 1)
        return [t.token for t in toks], comps[0]

    def test_messages_are_the_rendered_prompt(self):
        for conv in CONVERSATIONS:
            for gen_prompt in (True, False):
                ms = msgs(*conv)
                text = jinja_render(as_dicts(ms), gen_prompt)
                want_toks, want = self.stream(greq(text, max_tokens=6, ignore_eos=True))
                got_toks, got = self.stream(greq(messages=ms, max_tokens=6, ignore_eos=True,
                                                 no_generation_prompt=not gen_prompt))
                self.assertEqual(got.usage.prompt_tokens, want.usage.prompt_tokens, (conv, gen_prompt))
                self.assertEqual(got_toks, want_toks, (conv, gen_prompt))
                self.assertEqual(got.text, want.text)

    def test_agent_continues_with_the_whole_conversation(self):
        conv = [("system", "You are terse."), ("user", "Name three colours.")]
        first = jinja_render([{"role": r, "content": c} for r, c in conv])
        _, c1 = self.stream(greq(messages=msgs(*conv), max_tokens=8, ignore_eos=True, agent_id="chat-a"))
        self.assertFalse(c1.usage.history_diverged)
        self.assertEqual(c1.usage.cached_tokens, 0)
        conv2 = conv + [("assistant", c1.text), ("user", "And three more?")]
        whole = jinja_render([{"role": r, "content": c} for r, c in conv2])
        self.assertTrue(whole.startswith(first), "the template's history is a prefix of the next turn")
        _, fresh = self.stream(greq(messages=msgs(*conv2), max_tokens=8, ignore_eos=True))
        toks2, c2 = self.stream(greq(messages=msgs(*conv2), max_tokens=8, ignore_eos=True, agent_id="chat-a"))
        # the first turn's prompt is a common prefix: its KV is reused, whatever the re-encoding of the answer
        self.assertGreaterEqual(c2.usage.cached_tokens, c1.usage.prompt_tokens - 1, c2.usage)
        self.assertEqual(c2.usage.prompt_tokens, fresh.usage.prompt_tokens)
        self.assertEqual(c2.text, fresh.text, "the continued agent answers as a fresh request does")
        # an edited earlier message: reported, recomputed from there, still the fresh answer
        conv3 = [("system", "You are verbose."), ("user", "Name three colours.")]
        _, fresh3 = self.stream(greq(messages=msgs(*conv3), max_tokens=8, ignore_eos=True))
        _, c3 = self.stream(greq(messages=msgs(*conv3), max_tokens=8, ignore_eos=True, agent_id="chat-a"))
        self.assertTrue(c3.usage.history_diverged)
        self.assertLess(c3.usage.cached_tokens, c1.usage.prompt_tokens)
        self.assertEqual(c3.text, fresh3.text)
        self.c.drop_agent("chat-a")

    def test_bad_messages_are_invalid_argument_naming_the_field(self):
        cases = [
            (greq("a prompt", messages=msgs(("user", "hi"))), "messages: give prompt, prompt_ids or messages"),
            (greq(ids=[1, 2], messages=msgs(("user", "hi"))), "messages: give prompt, prompt_ids or messages"),
            (greq(messages=[pb.ChatMessage(role="", content="x")]), "messages[0].role is empty"),
        ]
        for req, needle in cases:
            code, details = code_of(lambda: self.c.submit(req))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertIn(needle, details)

    def test_kvctl_chat_two_turns_on_its_own_agent(self):
        p = subprocess.run([KVCTL, "--addr", self.srv.addr, "chat", "--system", "Be brief.", "-n", "4", "--ignore-eos"],
                           input="Hello\n\nHow are you?\n/exit\n", capture_output=True, text=True, timeout=BOUND)
        self.assertEqual(p.returncode, 0, p.stderr)
        usage = [l for l in p.stderr.splitlines() if l.startswith("[prompt")]
        self.assertEqual(len(usage), 2, p.stderr)
        self.assertIn("generated 4", usage[1])
        self.assertNotIn("cached 0)", usage[1], "the second turn reuses the first turn's KV")
        self.assertEqual(len(self.c.list_agents()), 0, "kvctl chat drops the agent it made")


class NoTemplate(unittest.TestCase):
    def test_a_model_without_a_template_refuses_messages(self):
        srv = Server(model=os.path.join(MODELS, "tiny-llama2tok")).start()
        try:
            code, details = code_of(lambda: srv.client().submit(greq(messages=msgs(("user", "hi")))))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("messages:", details)
            self.assertIn("chat_template", details)
        finally:
            srv.stop()


class ChatFromGGUF(unittest.TestCase):
    """The same model as a GGUF file (tests/gen_gguf.sh: weights, tokenizer, chat template and
    end-of-turn ids all from its metadata) serves the same conversations token for token,
    stopping at the same end of turn."""

    def test_a_gguf_file_chats_as_its_directory_does(self):
        gguf = os.path.join(MODELS, "gguf", "tiny-qwen3chat.gguf")
        dsrv, gsrv = Server(model=CHAT_MODEL).start(), Server(model=gguf).start()
        try:
            dc, gc = dsrv.client(), gsrv.client()
            for conv in CONVERSATIONS:
                for kw in (dict(max_tokens=8, ignore_eos=True), dict(max_tokens=40)):
                    req = greq(messages=msgs(*conv), **kw)
                    (dt, (d,)), (gt, (g,)) = dc.run_stream(req), gc.run_stream(req)
                    self.assertEqual([t.token for t in gt], [t.token for t in dt], conv)
                    self.assertEqual((g.text, g.finish_reason, g.usage.prompt_tokens),
                                     (d.text, d.finish_reason, d.usage.prompt_tokens), conv)
        finally:
            for s in (dsrv, gsrv):
                s.stop()


if __name__ == "__main__":
    sys.exit(harness.run(__name__, "rpc-chat"))
