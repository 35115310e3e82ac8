"""End to end on the real embedded model: `semcache serve` in a subprocess, the real SDKs and curl."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.model
ROOT = Path(__file__).parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("e2e") / "server.log"
    env = {**os.environ, "SEMCACHE_MAX_QUEUE_WAIT": "300"}
    with open(log, "w") as out:
        cache = tmp_path_factory.mktemp("e2e-cache")
        proc = subprocess.Popen([sys.executable, "-m", "semcache", "serve", "--port", str(port), "--cache-dir", str(cache)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(f"http://127.0.0.1:{port}/health/ready", proc)
        yield f"http://127.0.0.1:{port}", log, cache
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server[0], api_key="test", max_retries=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="test", max_retries=0)


class TestRealModel:
    def test_startup_log(self, server):
        """Start-up logs say port bound, model loading, loaded in N s, ready, in that order."""
        text = server[1].read_text()
        marks = [text.index(m) for m in ("port bound", "model loading", "model loaded in", "ready")]
        assert marks == sorted(marks)
        assert "BLAS: OpenBLAS" in text

    def test_second_daemon_on_the_same_cache_dir_exits(self, server):
        """A second daemon on a cache folder in use exits 1 with an error naming the folder."""
        out = subprocess.run([sys.executable, "-m", "semcache", "serve", "--port", str(free_port()),
                              "--cache-dir", str(server[2])], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert f"the cache directory {server[2]} is in use by another semcache daemon" in out.stderr

    def test_anthropic_paris(self, claude):
        """Greedy answer names Paris, non-streaming and through messages.stream()."""
        msg = claude.messages.create(model="m", max_tokens=30, messages=QUESTION, extra_body={"temperature": 0})
        assert "Paris" in msg.content[0].text and msg.stop_reason == "end_turn"
        with claude.messages.stream(model="m", max_tokens=30, messages=QUESTION,
                                    extra_body={"temperature": 0}) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == msg.content[0].text

    def test_openai_paris_stream_equals_non_stream(self, oai):
        """At temperature 0 the streamed text equals the non-streamed text, and names Paris."""
        full = oai.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=30)
        text = full.choices[0].message.content
        chunks = oai.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=30, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text and streamed == text

    def test_count_tokens_equals_usage(self, claude):
        """count_tokens equals the sum of the three usage input counters for the same body."""
        counted = claude.messages.count_tokens(model="m", messages=QUESTION, system="Answer briefly.")
        u = claude.messages.create(model="m", max_tokens=1, messages=QUESTION, system="Answer briefly.").usage
        assert counted.input_tokens == u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens

    def test_stop_sequence(self, claude):
        """A stop sequence in the greedy answer ends it there and is reported."""
        msg = claude.messages.create(model="m", max_tokens=30, messages=QUESTION, stop_sequences=[" Paris"],
                                     extra_body={"temperature": 0})
        assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == " Paris"
        assert msg.content[0].text == "The capital of France is"

    def test_max_tokens(self, claude, oai):
        """max_tokens gives max_tokens / length with exactly that many tokens."""
        msg = claude.messages.create(model="m", max_tokens=3, messages=QUESTION)
        assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
        r = oai.chat.completions.create(model="m", messages=QUESTION, max_tokens=3)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3

    def test_seed_reproduces_text(self, oai):
        """The same seeded request at temperature 1 gives the same text twice."""
        ask = dict(model="m", messages=[{"role": "user", "content": "Write a short poem."}], temperature=1.0,
                   max_tokens=16, seed=1234)
        assert oai.chat.completions.create(**ask).choices[0].message.content == \
            oai.chat.completions.create(**ask).choices[0].message.content

    def test_malformed_body_names_field(self, claude, oai):
        """A malformed body is a 400 that names the field."""
        with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
            claude.messages.create(model="m", max_tokens=-1, messages=QUESTION)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            oai.chat.completions.create(model="m", messages=QUESTION, temperature=5)

    @pytest.mark.skipif(shutil.which("curl") is None,
                        reason="curl is not installed: `make test` installs it as root, else run `sudo apt-get install curl`")
    def test_readme_curl_examples(self, server):
        """The README's curl examples work as written (port swapped) and answer Paris."""
        readme = (ROOT / "README.md").read_text()
        blocks = re.findall(r"```sh\n(curl .*?)```", readme, re.S)
        assert len(blocks) >= 2
        port = server[0].rsplit(":", 1)[1]
        for block in blocks:
            cmd = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("\\\n", " ")
            out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "Paris" in out.stdout, out.stdout + out.stderr


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three colors.",
           "What is 2+2?", "Tell me a joke.", "Who wrote Hamlet?", "Explain gravity in one sentence.",
           "Name a fruit and describe it."]


def first_difference(got: str, want: str) -> str:
    """Where two answers part: the first differing token (by the model's tokenizer) and character."""
    from semcache.engine.models import embedded_model_path, load_gguf_tokenizer

    tok = load_gguf_tokenizer(embedded_model_path())
    a, b = tok.encode(got, add_special_tokens=False), tok.encode(want, add_special_tokens=False)
    t = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    c = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"first difference at token {t}, character {c}: {got!r} vs {want!r}"


LONG_PROMPT = "Summarise this text in one sentence.\n\n" + " ".join(
    f"Paragraph {i}: the river town of Vell kept its bridges in good repair, and every spring the "
    f"council counted the boats that passed under bridge number {i}." for i in range(20))


@pytest.fixture(scope="module")
def plain_loop():
    """Greedy answers from a plain mlx-lm loop (generate_step: one-shot prefill) on the same weights."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from semcache.text.chat import ChatMessage, PromptRenderer
    from semcache.engine.models import load_model

    loaded = load_model(None)
    renderer = PromptRenderer(loaded.tokenizer)

    def answer(prompt: str) -> str:
        ids = renderer.render([ChatMessage("user", prompt)])
        out = []
        for token, _ in generate_step(mx.array(ids), loaded.model, max_tokens=24):
            if token in loaded.info.eos_token_ids:
                break
            out.append(token)
        return loaded.tokenizer.decode(out)

    return answer


@pytest.fixture(scope="module")
def reference_texts(plain_loop):
    return [plain_loop(prompt) for prompt in PROMPTS]


@pytest.mark.slow
class TestExactness:
    def ask(self, oai, prompt):
        return oai.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=24).choices[0].message.content

    def test_greedy_alone_matches_plain_mlx_lm(self, oai, reference_texts):
        """One request alone: token-identical (compared as text) to the plain loop."""
        got = self.ask(oai, PROMPTS[1])
        want = reference_texts[1]
        assert got == want, first_difference(got, want)

    def test_long_prompt_chunked_prefill_matches_one_shot(self, oai, plain_loop):
        """A ~700-token prompt, prefilled by the server in 256-token chunks, answers as the one-shot loop."""
        got, want = self.ask(oai, LONG_PROMPT), plain_loop(LONG_PROMPT)
        assert got == want, first_difference(got, want)

    def test_greedy_batched_with_seven_others_matches(self, oai, reference_texts):
        """Eight concurrent requests, batched together, each match the plain loop."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: self.ask(oai, p), PROMPTS))
        for i, (g, w) in enumerate(zip(got, reference_texts)):
            assert g == w, f"prompt {i}: {first_difference(g, w)}"
