"""`ghostvis serve` on CPU: the real openai client against served tiny models (random weights, the default
tokenizer), streaming against the non-streamed greedy answer, images on a tiny VLM, auth, each bad request's
4xx JSON, concurrent requests batched together, a bounded loopback load, and a disconnect freeing its row."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra: pip install 'ghostvis[serve]'")
openai = pytest.importorskip("openai")

from plans import cpu_plan  # noqa: E402
from test_gpt import randomized  # noqa: E402
from test_vision import randomize_  # noqa: E402

from ghostvis_core import checkpoint as ckpt  # noqa: E402
from ghostvis_core.config import GPTConfig  # noqa: E402
from ghostvis_core.sampling import SamplingParams  # noqa: E402
from ghostvis_core.serving.load import httpx, run_load  # noqa: E402

KEY = "sk-test-key"


# ---- fixtures: saved runs and servers in threads -----------------------------------------------------------

def save_run(root, name: str, vision: bool):
    """A run folder of a random tiny chat model (GPT, or VLM with the tiny tower) and the default tokenizer."""
    from ghostvis_core.data import default_tokenizer
    from ghostvis_core.vision_config import VLMConfig, get_vision_config
    from ghostvis_core.vlm import VLM

    tok = default_tokenizer(4096)
    text = GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, vocab_size=tok.vocab_size, sequence_len=128)
    if vision:
        config = VLMConfig(text=text, vision=get_vision_config("tiny"), image_token_id=tok.image_id)
        model = randomize_(VLM(config, cpu_plan(text)), seed=0, std=0.1)
        kind, fmt, cfg = "vlm", "image-chat", config.to_dict()
    else:
        model, kind, fmt, cfg = randomized(text, seed=3), "gpt", "chat", text.to_dict()
    state = ckpt.TrainState(step=1, model_kind=kind, model_config=cfg, data_format=fmt, recipe="chat_sft")
    run = root / name
    ckpt.save_checkpoint(run, 1, model_state=model.state_dict(), optimizer_state={}, state=state.to_dict(),
                         keep_last=0)
    tok.save(run / "tokenizer")
    return run


class Server:
    """uvicorn serving an app in a thread, on a loopback socket bound before it starts."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(loaded, api_key=None, **kwargs):
    from ghostvis_core.serving.app import create_app
    from ghostvis_core.serving.service import ServedModel

    service = ServedModel.from_loaded(loaded, **kwargs)
    return Server(create_app(service, api_key=api_key)), service


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("serve-home")
        mp.setenv("GHOSTVIS_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def text_loaded(home):
    from ghostvis_core.engine import load_for_inference

    return load_for_inference(str(save_run(home, "chat", vision=False)))


@pytest.fixture(scope="module")
def vlm_loaded(home):
    from ghostvis_core.engine import load_for_inference

    return load_for_inference(str(save_run(home, "vlm", vision=True)))


@pytest.fixture(scope="module")
def text_server(text_loaded, home):
    from ghostvis_core.serving.limits import ServeLimits

    (home / "images").mkdir(exist_ok=True)
    limits = ServeLimits(max_body_bytes=200_000, max_tokens=100, max_image_pixels=64 * 64,
                         image_root=home / "images")  # fmt: skip
    server, service = serve(text_loaded, api_key=KEY, batch_size=8, sync_every=4, limits=limits)
    yield server, service
    server.close()


@pytest.fixture(scope="module")
def vlm_server(vlm_loaded, home):
    from ghostvis_core.serving.limits import ServeLimits

    server, service = serve(vlm_loaded, batch_size=4, sync_every=4,
                            limits=ServeLimits(max_image_pixels=300 * 300, image_root=home))  # fmt: skip
    yield server, service
    server.close()


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def png_data_url(size=32, color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def slow_device(service, seconds: float):
    """Each decode step of the service's engine takes `seconds` longer (a slow device: a request is still
    generating when the test acts on it)."""
    real_step_fn = service.engine.step_fn

    def slow_step_fn(batch, mode):
        step = real_step_fn(batch, mode)
        return lambda: (time.sleep(seconds), step())

    service.engine.step_fn = slow_step_fn
    try:
        yield
    finally:
        service.engine.step_fn = real_step_fn


def open_stream(server, body: dict, key: str | None = None) -> socket.socket:
    """A streaming request on a raw socket, read up to its first event: the connection stays open (the request
    in flight) until the caller closes the socket (a client going away)."""
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"{auth}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)  # fmt: skip
    seen = b""
    while b"data: " not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return sock


def reference(loaded, ids, max_tokens, **sampling):
    """The engine's answer to the same prompt ids, alone (what the server must give)."""
    return loaded.engine.generate_many([ids], SamplingParams(**sampling), max_tokens, batch_size=1)[0]


# ---- the API -------------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "what colour is the ball?"}]


def test_chat_completion_and_its_stream_reassemble_to_the_greedy_answer(text_server, text_loaded):
    server, service = text_server
    c = client(server)
    done = c.chat.completions.create(model=service.name, messages=QUESTION, max_tokens=16, temperature=0)
    ids = text_loaded.tokenizer.encode_chat(QUESTION, add_generation_prompt=True)[0]
    ref = reference(text_loaded, ids, 16)
    answer = done.choices[0].message.content
    print(f"answer {answer!r} ({done.usage.completion_tokens} tokens, finish {done.choices[0].finish_reason})")
    assert answer == ref.text and done.choices[0].finish_reason == ref.finish_reason
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == len(ref.token_ids) > 0
    assert done.usage.total_tokens == len(ids) + len(ref.token_ids)
    chunks = list(c.chat.completions.create(model=service.name, messages=QUESTION, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == answer and sum(bool(d) for d in deltas) > 1  # really streamed, in pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and chunks[-1].choices == []


def test_completions_models_and_health(text_server, text_loaded):
    server, service = text_server
    c = client(server)
    done = c.completions.create(model=service.name, prompt="the red ball", max_tokens=10, temperature=0)
    ids = [text_loaded.tokenizer.bos_id, *text_loaded.tokenizer.encode("the red ball")]
    ref = reference(text_loaded, ids, 10)
    assert done.choices[0].text == ref.text and done.usage.completion_tokens == len(ref.token_ids)
    by_ids = c.completions.create(model=service.name, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == ref.text
    models = c.models.list().data
    assert [m.id for m in models] == ["chat"] and models[0].max_model_len == 128
    health = httpx.get(server.url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_concurrent_requests_share_decode_steps_with_their_own_sampling(text_server, text_loaded):
    server, service = text_server
    sched = service.scheduler
    settings = [dict(temperature=0.0), dict(temperature=0.9, seed=1), dict(temperature=1.2, top_k=20, seed=2),
                dict(temperature=0.8, top_p=0.8, seed=3)] * 2  # fmt: skip
    steps0, rows0 = sched.decode_steps, sched.row_steps

    async def go():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        def one(s):
            extra = {"ignore_eos": True, **({"top_k": s["top_k"]} if "top_k" in s else {})}
            native = {k: v for k, v in s.items() if k != "top_k"}
            return c.chat.completions.create(model="chat", messages=QUESTION, max_tokens=24, extra_body=extra, **native)

        return await asyncio.gather(*(one(s) for s in settings))

    with slow_device(service, 0.005):  # each request outlasts the arrival of the others
        results = asyncio.run(go())
    ids = text_loaded.tokenizer.encode_chat(QUESTION, add_generation_prompt=True)[0]
    for s, r in zip(settings, results, strict=True):
        ref = reference(text_loaded, ids, 24, ignore_eos=True, **s)
        assert r.choices[0].message.content == ref.text, s
    steps, rows = sched.decode_steps - steps0, sched.row_steps - rows0
    print(f"{len(settings)} concurrent requests: {steps} decode steps, {rows / steps:.2f} rows per step")
    assert rows / steps > 2  # batched together, not one by one (one by one would be 1.0)


def test_image_prompt_on_a_tiny_vlm(vlm_server, vlm_loaded, home):
    from PIL import Image

    from ghostvis_core.engine import generate_text

    server, service = vlm_server
    Image.new("RGB", (32, 32), (200, 30, 30)).save(home / "red.png")
    url = png_data_url()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "\nwhat colour is it?"}]}]  # fmt: skip
    done = client(server).chat.completions.create(model="vlm", messages=messages, max_tokens=8, temperature=0)
    ref = generate_text(vlm_loaded, "what colour is it?", 8, image=home / "red.png")
    print(f"VLM answer {done.choices[0].message.content!r}")
    assert done.choices[0].message.content == ref
    P = vlm_loaded.model.config.num_image_tokens
    assert done.usage.prompt_tokens > P  # the image counts as its P tokens
    by_path = client(server).chat.completions.create(
        model="vlm", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(home / "red.png")}},
                                               {"type": "text", "text": "\nwhat colour is it?"}]}],
        max_tokens=8, temperature=0)  # fmt: skip
    assert by_path.choices[0].message.content == ref


def test_a_request_without_the_key_is_401(text_server):
    server, _ = text_server
    with pytest.raises(openai.AuthenticationError) as exc:
        client(server, key="wrong").chat.completions.create(model="chat", messages=QUESTION, max_tokens=2)
    assert exc.value.status_code == 401 and "API key" in exc.value.body["message"]
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + "/").status_code == 200  # the page holds nothing; it asks for the key


def _bad_cases(home):
    outside = home.parent / "outside.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(outside)
    big = png_data_url(size=400)  # 160000 pixels > the vlm server's 300x300 limit
    chat = {"messages": QUESTION, "max_tokens": 4}

    def with_image(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "hi"}]}]}  # fmt: skip

    return [
        ("malformed-json", b'{"messages": [', 400, "invalid_json", "not valid JSON"),
        ("not-an-object", b"[1, 2]", 400, "invalid_json", "must be a JSON object"),
        ("unknown-field", {**chat, "frobnicate": 1}, 400, "unknown_field", "frobnicate"),
        ("bad-role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "role"),
        ("n-2", {**chat, "n": 2}, 400, None, "n=2"),
        ("max-tokens-over-limit", {**chat, "max_tokens": 1000}, 400, None, "above this server's limit"),
        ("temperature-negative", {**chat, "temperature": -1}, 400, "invalid_value", "temperature"),
        ("prompt-too-long", {"messages": [{"role": "user", "content": "ball " * 400}]}, 400,
         "context_length_exceeded", "the model's context is 128"),
        ("wrong-model", {**chat, "model": "other"}, 404, "model_not_found", "not served here"),
        ("body-too-large", {"messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "body_too_large",
         "--max-body-bytes"),
        ("image-on-text-model", with_image(png_data_url()), 400, "images_not_supported", "cannot see images"),
    ], [
        ("bad-image-bytes", with_image("data:image/png;base64," + base64.b64encode(b"not a png").decode()), 400,
         "invalid_image", "not a readable image"),
        ("bad-base64", with_image("data:image/png;base64,@@@"), 400, "invalid_image", "not valid base64"),
        ("remote-url", with_image("https://example.com/a.png"), 400, "invalid_image", "not fetched"),
        ("path-outside-root", with_image(str(outside)), 403, "image_outside_root", "outside the image root"),
        ("dotdot-outside-root", with_image("../outside.png"), 403, "image_outside_root", "outside the image root"),
        ("missing-path", with_image("nope.png"), 400, "invalid_image", "not found"),
        ("too-many-pixels", with_image(big), 413, "image_too_large", "--max-image-pixels"),
    ]


def test_each_bad_request_is_its_4xx_with_an_openai_error_body(text_server, vlm_server, home):
    text_cases, image_cases = _bad_cases(home)
    for (server, _), cases, headers in ((text_server, text_cases, {"Authorization": f"Bearer {KEY}"}),
                                        (vlm_server, image_cases, {})):  # fmt: skip
        for name, body, status, code, fragment in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = httpx.post(server.url + "/v1/chat/completions", content=content,
                           headers={**headers, "Content-Type": "application/json"}, timeout=60)  # fmt: skip
            err = r.json()["error"]
            print(f"{name}: {r.status_code} {err['code']}: {err['message']}")
            assert r.status_code == status, name
            assert fragment in err["message"] and err["code"] == code, name
            assert err["type"] and "Traceback" not in r.text, name
    m = httpx.get(text_server[0].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert m["requests_by_status"]["400"] >= 8 and m["requests_by_status"]["413"] >= 1  # refusals are counted
    r = httpx.get(text_server[0].url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_concurrency_limit_is_429_with_retry_after(text_loaded):
    from ghostvis_core.serving.limits import ServeLimits

    server, service = serve(text_loaded, batch_size=2, limits=ServeLimits(max_concurrent=1))
    try:
        with slow_device(service, 0.02):
            held = open_stream(server, {"messages": QUESTION, "max_tokens": 100, "stream": True, "ignore_eos": True})
            r = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
            held.close()
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        server.close()


def test_bounded_load_64_streaming_clients_lose_nothing(text_server):
    server, service = text_server
    sched = service.scheduler
    steps0, rows0 = sched.decode_steps, sched.row_steps
    n_clients, n_requests, out = 64, 5, 8
    prompts = [[service.tokenizer.bos_id, *service.tokenizer.encode(f"ball {i}")] for i in range(17)]
    result = asyncio.run(run_load(server.url, n_clients, n_requests, prompts, out, api_key=KEY, timeout_s=300))
    s = result.summary()
    print(f"load {n_clients} clients x {n_requests}: {s['requests_ok']} ok in {s['elapsed_s']:.1f} s, "
          f"{s['output_tokens_per_s']:.0f} output tok/s, latency p50 {s['latency_ms']['p50']:.0f} ms "
          f"p99 {s['latency_ms']['p99']:.0f} ms, TTFT p50 {s['ttft_ms']['p50']:.0f} ms")
    assert result.failures == [] and result.num_ok == n_clients * n_requests
    assert result.completion_tokens == n_clients * n_requests * out  # ignore_eos: every request made `out`
    m = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert m["requests_by_status"]["200"] >= n_clients * n_requests and m["requests_in_flight"] == 0
    occupancy = (sched.row_steps - rows0) / ((sched.decode_steps - steps0) * sched.batch_size)
    print(f"batch occupancy during the load: {occupancy:.2f} of {sched.batch_size} rows")
    assert occupancy > 0.5  # 64 clients kept the 8 rows mostly busy


def test_a_client_that_disconnects_mid_stream_frees_its_row(text_server):
    server, service = text_server
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(server.url + "/metrics", headers=headers).json()
    with slow_device(service, 0.01):  # the stream is far from done when its client leaves
        sock = open_stream(server, {"messages": QUESTION, "max_tokens": 100, "stream": True, "ignore_eos": True},
                           key=KEY)  # fmt: skip
        sock.close()  # the client goes away after its first chunk
    deadline = time.monotonic() + 30
    while True:
        m = httpx.get(server.url + "/metrics", headers=headers).json()
        if m["requests_cancelled"] > before["requests_cancelled"] and m["active_rows"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["requests_in_flight"] == 0 and m["completion_tokens_total"] >= before["completion_tokens_total"]
    assert service.scheduler.generated_tokens - before["generated_tokens_total"] < 100  # stopped early
