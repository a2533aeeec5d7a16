"""serve.py as its clients see it: real server processes on 127.0.0.1 (port 0, the printed address), talked to
with the official `openai` client, with raw http.client for the errors, with 50 threads at once, and through the
chat page in headless Chromium driven over the DevTools protocol (a small websocket client below).

Two servers: the demo model (answers checked against `python infer.py` for the same question, image, seed and
settings), and "slow", the demo model with its lm_head bias pushed towards one token and a 32768-token context, so
that it answers "aaaa..." for as long as max_tokens allows (1-6 ms a token: 30000 tokens take 30 s or more): what the tests of --timeout, the full
queue, a client that leaves, and Ctrl-C need. Every server process is stopped in teardown."""
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch

import imp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "checkpoints", "demo")
EXAMPLES = os.path.join(ROOT, "examples")
SCREENSHOT = os.path.join(ROOT, "docs", "serve.png")
THREADS = ["--threads", "1"]  # the same on both sides of every comparison with infer.py
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
           NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")  # loopback only, whatever proxy the environment names
ENV.pop("IMP_MODEL", None)


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def example(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def user(text, image=None) -> dict:
    if image is None:
        return dict(role="user", content=text)
    return dict(role="user", content=[dict(type="text", text=text),
                                      dict(type="image_url", image_url=dict(url=data_url(image)))])


# ----------------------------------------------------------------------------------------------------------------
# Servers and plain HTTP


class Server:
    """`python serve.py --port 0 ...` in its own process; the port is read from the line it prints."""

    def __init__(self, folder, *options):
        self.log = open(os.path.join(folder, "serve-stderr.txt"), "w+")
        self.process = subprocess.Popen([sys.executable, "serve.py", "--port", "0", *THREADS, *options], cwd=ROOT,
                                        env=ENV, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.first_line = self.process.stdout.readline()  # the model loads in seconds; a crash ends the pipe
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", self.first_line)
        if found is None:
            self.stop()
            self.log.seek(0)
            raise AssertionError(f"serve.py printed no address: {self.first_line!r}\n{self.log.read()[-3000:]}")
        self.port = int(found.group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process.stdout.close()
        self.log.close()

    def rss_kib(self) -> int:
        status = open(f"/proc/{self.process.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    server = Server(str(tmp_path_factory.mktemp("demo")), "--queue", "32")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """The demo model that never stops talking (the same token every time) within a 32768-token context."""
    folder = tmp_path_factory.mktemp("slow")
    model = imp.Imp.from_pretrained(DEMO)
    with torch.no_grad():
        model.llm.lm_head.bias[model.tokenizer.token_to_id("a")] += 100.0
    model.config.max_length = 32768
    model.save_pretrained(str(folder / "model"))
    server = Server(str(folder), "--model", str(folder / "model"), "--queue", "1", "--timeout", "4")
    yield server
    server.stop()


def request(port, method, path, body=None, headers=None, timeout=60):
    """-> (status, headers, parsed JSON or text). body: a dict (sent as JSON) or bytes."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read().decode("utf-8")
    connection.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, response, json.loads(raw) if is_json else raw


def chat(port, body):
    return request(port, "POST", "/v1/chat/completions", body)


def assert_healthy(port):
    status, _, health = request(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    return health


def infer_answers(*arguments, stdin=None) -> list:
    """`python infer.py ...` as a user runs it: one answer per stdout line."""
    result = subprocess.run([sys.executable, "infer.py", *THREADS, *arguments], cwd=ROOT, env=ENV, input=stdin,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# The API through the official openai client: the same answers as infer.py


@pytest.fixture(scope="module")
def client(demo):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{demo.port}/v1", api_key="not-needed", max_retries=0,
                         http_client=openai.DefaultHttpxClient(trust_env=False))  # no proxy from the environment


def streamed(client, **arguments):
    """The streamed answer joined, and the last chunk."""
    pieces, last = [], None
    for chunk in client.chat.completions.create(stream=True, **arguments):
        assert chunk.object == "chat.completion.chunk"
        pieces += [choice.delta.content or "" for choice in chunk.choices]
        last = chunk
    return "".join(pieces), last


@pytest.mark.parametrize("settings,flags", [
    ({}, []),
    (dict(temperature=3, top_p=0.95, seed=3, max_tokens=12), ["--temperature", "3", "--top-p", "0.95", "--seed",
                                                              "3", "--max-new-tokens", "12"]),  # far from greedy
], ids=["greedy", "sampled"])
def test_openai_client_answers_as_infer_does(client, settings, flags):
    question, image = "What color is the circle?", example("one_circle.png")
    expected, = infer_answers(*flags, image, question)
    messages = [user(question, image)]
    completion = client.chat.completions.create(model="demo", messages=messages, **settings)
    assert completion.object == "chat.completion" and completion.model == "demo"
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == ("length" if completion.usage.completion_tokens == 12 else "stop")
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens > 0
    stats = completion.model_extra["nanoimp_stats"]
    assert stats["prompt_tokens"] == usage.prompt_tokens and stats["T_VE"] > 0 and stats["S_gen"] > 0
    text, last = streamed(client, model="demo", messages=messages, **settings)
    assert text == expected
    assert last.choices[0].finish_reason == completion.choices[0].finish_reason
    assert last.usage.completion_tokens == usage.completion_tokens and "nanoimp_stats" in last.model_extra


FIRST, SECOND = "What color is the circle?", "What shape is it?"


@pytest.fixture(scope="module")
def chat_answers():
    """`infer.py --chat` on one_circle.png, asked FIRST then SECOND over a pipe."""
    answers = infer_answers("--chat", example("one_circle.png"), stdin=f"{FIRST}\n{SECOND}\n")
    assert len(answers) == 2
    return answers


def follow_up_length(first_answer: str) -> int:
    """Positions of the demo's prompt for SECOND after FIRST and its answer, with the image's patches."""
    prompt = imp.build_prompt(SECOND, [(FIRST, first_answer)], with_image=True)
    patches = imp.ImpConfig.from_dict(json.load(open(os.path.join(DEMO, "config.json")))).vision.num_patches
    return len(imp.load_tokenizer(DEMO).encode(prompt).ids) - 1 + patches  # <image> -> its patches


def test_multi_turn_answers_as_infer_chat_does(client, chat_answers):
    """The history becomes Imp's multi-turn prompt exactly as in infer.py --chat (the image in the first turn)."""
    first, second, expected = FIRST, SECOND, chat_answers
    messages = [dict(role="system", content="ignored: Imp's template has its own"),
                user(first, example("one_circle.png")), dict(role="assistant", content=expected[0]), user(second)]
    completion = client.chat.completions.create(model="demo", messages=messages)
    assert completion.choices[0].message.content == expected[1]
    # The demo answers the follow-up without the history too: the prompt's length shows that the history is there.
    assert completion.usage.prompt_tokens == follow_up_length(expected[0])
    assert streamed(client, model="demo", messages=messages)[0] == expected[1]


def test_text_only_question(client):
    expected, = infer_answers("--text", "How many shapes are there?")
    completion = client.chat.completions.create(model="demo", messages=[user("How many shapes are there?")])
    assert completion.choices[0].message.content == expected


def test_stop_strings_and_max_tokens(client):
    messages = [user("What color is the circle?", example("one_circle.png"))]  # the answer: "The circle is red."
    for stop, before in ((" is", "The circle"), ([" red", " is"], "The circle"), ("is red", "The circle "),
                         ("ircle", "The c")):
        completion = client.chat.completions.create(model="demo", messages=messages, stop=stop)
        assert completion.choices[0].message.content == before  # cut just before the stop string
        assert completion.choices[0].finish_reason == "stop"
        text, last = streamed(client, model="demo", messages=messages, stop=stop)
        assert text == before and last.choices[0].finish_reason == "stop"
    assert client.chat.completions.create(model="demo", messages=messages, stop="nowhere").choices[0].message.content \
        == "The circle is red."
    short = client.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert short.choices[0].message.content == "The circle"  # "The", " circle": two tokens


def test_models_health_and_page(demo, client):
    assert [model.id for model in client.models.list()] == ["demo"]
    health = assert_healthy(demo.port)
    assert health["model"] == "demo" and health["queue_size"] == 32
    status, response, page = request(demo.port, "GET", "/")
    assert status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "default-src 'none'" in response.getheader("Content-Security-Policy")
    assert "<script>" in page and "/v1/chat/completions" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must load nothing from elsewhere"


# ----------------------------------------------------------------------------------------------------------------
# Errors: each one a 4xx with a JSON error naming the problem, and the server goes on


def bomb_png() -> bytes:
    """A valid PNG header claiming 10000 x 10000 pixels: over PIL's limit for a warning (89M pixels), which
    imp.open_image turns into a refusal, and under the one for an error (179M)."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def with_image(url: str, text="What is it?") -> dict:
    return dict(messages=[dict(role="user", content=[dict(type="text", text=text),
                                                     dict(type="image_url", image_url=dict(url=url))])])


CIRCLE = example("one_circle.png")
BAD_REQUESTS = {  # name: (body, status, error code, words the message must contain)
    "not JSON": (b"{'messages': }", 400, "invalid_json", "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "invalid_json", "JSON object"),
    "no messages": (dict(temperature=0), 400, "invalid_messages", "messages"),
    "unknown role": (dict(messages=[dict(role="tool", content="x")]), 400, "invalid_role", "role"),
    "two user turns": (dict(messages=[user("a"), user("b")]), 400, "invalid_messages", "alternate"),
    "ends with the answer": (dict(messages=[user("a"), dict(role="assistant", content="b")]), 400,
                             "invalid_messages", "last message"),
    "empty question": (dict(messages=[user("   ")]), 400, "empty_message", "no text"),
    "content a number": (dict(messages=[dict(role="user", content=7)]), 400, "invalid_type", "content"),
    "temperature a string": (dict(messages=[user("a")], temperature="hot"), 400, "invalid_type", "temperature"),
    "max_tokens zero": (dict(messages=[user("a")], max_tokens=0), 400, "invalid_value", "max_tokens"),
    "top_p above 1": (dict(messages=[user("a")], top_p=2), 400, "invalid_value", "top_p"),
    "stream a string": (dict(messages=[user("a")], stream="yes"), 400, "invalid_type", "stream"),
    "stop a number": (dict(messages=[user("a")], stop=3), 400, "invalid_type", "stop"),
    "n=2": (dict(messages=[user("a")], n=2), 400, "invalid_value", "n must be 1"),
    "remote image URL": (with_image("http://127.0.0.1:9/cat.png"), 400, "invalid_image_url", "never fetched"),
    "file image URL": (with_image("file:///etc/passwd"), 400, "invalid_image_url", "never fetched"),
    "bad base64": (with_image("data:image/png;base64,iVBOR%%%"), 400, "invalid_base64", "base64"),
    "not an image": (with_image("data:image/png;base64," + base64.b64encode(b"hello, world").decode()), 400,
                     "invalid_image", "not an image"),
    "decompression bomb": (with_image("data:image/png;base64," + base64.b64encode(bomb_png()).decode()), 400,
                           "invalid_image", "too large to open safely"),
    "two images": (dict(messages=[dict(role="user", content=[
        dict(type="text", text="Which?"), dict(type="image_url", image_url=dict(url=data_url(CIRCLE))),
        dict(type="image_url", image_url=dict(url=data_url(CIRCLE)))])]), 400, "too_many_images", "one image"),
    "prompt too long": (dict(messages=[user("What color is the circle? " * 40)]), 400, "context_length_exceeded",
                        "context"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_a_json_error_and_the_server_goes_on(demo, name):
    body, status, code, words = BAD_REQUESTS[name]
    got, _, answer = chat(demo.port, body)
    assert got == status, answer
    assert answer["error"]["code"] == code and words in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert_healthy(demo.port)


@pytest.mark.parametrize("method,path,status", [("GET", "/nowhere", 404), ("POST", "/v1/completions", 404),
                                                ("GET", "/v1/chat/completions", 405), ("DELETE", "/health", 405)])
def test_unknown_routes_and_methods(demo, method, path, status):
    got, _, answer = request(demo.port, method, path, b"{}" if method == "POST" else None)
    assert got == status and answer["error"]["code"] in ("not_found", "method_not_allowed")
    assert_healthy(demo.port)


def test_body_size_limit_and_missing_length(demo):
    """413 from the Content-Length header alone: the 25 MB are never read. No Content-Length: 411."""
    connection = http.client.HTTPConnection("127.0.0.1", demo.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Length", str(25 * 1024 * 1024))
    connection.endheaders(b"{")
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    with socket.create_connection(("127.0.0.1", demo.port), timeout=30) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 411")
    assert_healthy(demo.port)


# ----------------------------------------------------------------------------------------------------------------
# Load: 50 clients at once against the demo model


QUESTIONS = [(example("one_circle.png"), "What color is the circle?"),
             (example("three_squares.png"), "How many shapes are there?"),
             (example("circle_and_square.png"), "What shape is the blue object?"),
             (example("one_triangle.png"), "What color is the triangle?"),
             (None, "What shape is the red object?")]


def load_round(port, count, expected):
    """`count` threads, each asking QUESTIONS[i % 5]: -> {answered, refused, wrong, lost}, seconds, latencies."""
    outcomes, latencies = [None] * count, [None] * count

    def ask(i):
        image, question = QUESTIONS[i % len(QUESTIONS)]
        started = time.perf_counter()
        try:
            status, response, answer = chat(port, dict(messages=[user(question, image)], max_tokens=8))
        except OSError as error:
            outcomes[i] = f"lost: {error}"
            return
        latencies[i] = time.perf_counter() - started
        if status == 503 and response.getheader("Retry-After", "").isdigit():
            outcomes[i] = "refused"
        elif status == 200:
            right = answer["choices"][0]["message"]["content"] == expected[i % len(QUESTIONS)]
            outcomes[i] = "answered" if right else f"wrong: {answer['choices'][0]['message']['content']!r}"
        else:
            outcomes[i] = f"lost: {status} {answer}"

    started = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    seconds = time.perf_counter() - started
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    problems = [outcome for outcome in outcomes if outcome not in ("answered", "refused")]
    assert not problems, problems[:5]
    return outcomes.count("answered"), outcomes.count("refused"), seconds, sorted(filter(None, latencies))


def test_fifty_clients_at_once(demo):
    expected = []
    for image, question in QUESTIONS:
        status, _, answer = chat(demo.port, dict(messages=[user(question, image)], max_tokens=8))
        assert status == 200
        expected.append(answer["choices"][0]["message"]["content"])
    assert len(set(expected)) >= 4, f"the questions should have different answers: {expected}"
    results = [load_round(demo.port, 50, expected)]  # warms up every thread and buffer
    rss_before = demo.rss_kib()
    results.append(load_round(demo.port, 50, expected))
    rss_after = demo.rss_kib()
    for answered, refused, seconds, latencies in results:
        assert answered + refused == 50 and answered >= 33  # at least the 32 queued plus the one running
        print(f"\n50 clients: {answered} answered, {refused} refused (503) in {seconds:.2f} s = "
              f"{answered / seconds:.1f} answers/s; latency median {latencies[len(latencies) // 2]:.2f} s, "
              f"max {latencies[-1]:.2f} s")
    print(f"RSS {rss_before / 1024:.0f} MiB -> {rss_after / 1024:.0f} MiB after the second round")
    assert rss_after - rss_before < 100 * 1024, "memory grows with every round"
    assert_healthy(demo.port)


# ----------------------------------------------------------------------------------------------------------------
# The slow model: --timeout, the full queue, a client that leaves, Ctrl-C


def long_stream_body(max_tokens=30000) -> dict:
    return dict(messages=[user("Talk.")], max_tokens=max_tokens, stream=True)


def read_events(response):
    """Server-sent events of a streamed answer -> list of parsed JSON payloads, and whether [DONE] came."""
    events, done = [], False
    for line in response.read().decode().split("\n\n"):
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


def stream_events(port, body, timeout=60):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    events, done = read_events(response)
    connection.close()
    return response.status, events, done


def test_timeout_cuts_the_stream_with_an_error_event(slow):
    started = time.perf_counter()
    status, events, done = stream_events(slow.port, long_stream_body())
    seconds = time.perf_counter() - started
    assert status == 200 and done
    assert 3.5 < seconds < 8, seconds  # --timeout 4; 30000 tokens would take 30 s or more
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if "choices" in e)
    assert len(text) > 50 and set(text) == {"a"}
    assert events[-1]["error"]["code"] == "timeout" and "--timeout" in events[-1]["error"]["message"]
    assert_healthy(slow.port)


def test_full_queue_gets_503_with_retry_after(slow):
    """--queue 1: one request runs, one waits, the third is refused at once. The waiting one is cut by --timeout
    (its clock started when it arrived), as a JSON 504."""
    results = {}
    running = threading.Thread(target=lambda: results.update(running=stream_events(slow.port, long_stream_body())))
    running.start()
    wait_until(lambda: assert_healthy(slow.port)["busy"], 5, "the first request runs")
    waiting = threading.Thread(target=lambda: results.update(waiting=chat(slow.port, dict(messages=[user("Talk.")],
                                                                                        max_tokens=30000))))
    waiting.start()
    wait_until(lambda: assert_healthy(slow.port)["waiting"] == 1, 5, "the second request waits")
    started = time.perf_counter()
    status, response, answer = chat(slow.port, dict(messages=[user("Talk.")], max_tokens=5))
    assert time.perf_counter() - started < 2, "a refusal must not wait"
    assert status == 503 and answer["error"]["code"] == "server_busy" and "busy" in answer["error"]["message"]
    assert int(response.getheader("Retry-After")) >= 1
    running.join(timeout=30)
    waiting.join(timeout=30)
    assert results["running"][0] == 200 and results["running"][1][-1]["error"]["code"] == "timeout"
    status, _, answer = results["waiting"]
    assert status == 504 and answer["error"]["code"] == "timeout"
    wait_until(lambda: not assert_healthy(slow.port)["busy"], 5, "the worker is free again")
    status, _, answer = chat(slow.port, dict(messages=[user("Talk.")], max_tokens=5))
    assert status == 200 and answer["choices"][0]["message"]["content"] == "aaaaa"


def test_a_client_that_leaves_stops_its_generation(slow):
    wait_until(lambda: not assert_healthy(slow.port)["busy"], 10, "the worker is free")
    cancelled = assert_healthy(slow.port)["cancelled"]
    body = json.dumps(long_stream_body()).encode()
    with socket.create_connection(("127.0.0.1", slow.port), timeout=30) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while received.count(b"data: ") < 5:  # a few tokens in: it is generating
            received += raw.recv(4096)
    left = time.perf_counter()
    wait_until(lambda: not assert_healthy(slow.port)["busy"], 1.5, "the generation stops after the client left")
    assert time.perf_counter() - left < 1.5  # the answer had 30 s or more and --timeout 4 s to go
    assert assert_healthy(slow.port)["cancelled"] == cancelled + 1


def test_ctrl_c_stops_the_server_cleanly(slow):
    """SIGINT in the middle of a generation: exit code 0 and a last line (last test of the slow server)."""
    thread = threading.Thread(target=lambda: stream_events(slow.port, long_stream_body(), timeout=30), daemon=True)
    thread.start()
    wait_until(lambda: assert_healthy(slow.port)["busy"], 5, "a generation runs")
    slow.process.send_signal(signal.SIGINT)
    assert slow.process.wait(timeout=10) == 0
    assert "serve.py: stopped" in slow.process.stdout.read()
    thread.join(timeout=10)


def test_bad_options_are_one_line(tmp_path, capsys):
    import serve  # in this process: no 5-second start per case
    for options, words in ((["--port", "70000"], "--port"), (["--model", str(tmp_path)], str(tmp_path)),
                           (["--queue", "0"], "--queue"), (["--colour"], "unrecognized")):
        assert serve.main(options) == 2
        error = capsys.readouterr().err
        assert words in error and len(error.strip().splitlines()) == 1, error


# ----------------------------------------------------------------------------------------------------------------
# The page in headless Chromium, over the DevTools protocol: a websocket client in ~40 lines of the standard library


class DevTools:
    """One websocket to a page target (RFC 6455: a handshake, then masked text frames out, plain frames in)."""

    def __init__(self, url: str):
        found = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url)
        host, port, path = found.group(1), int(found.group(2)), found.group(3)
        self.socket = socket.create_connection((host, port), timeout=60)
        self.stream = self.socket.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: "
                            f"Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        status = self.stream.readline()
        assert b" 101 " in status, status
        while self.stream.readline() not in (b"\r\n", b""):  # the rest of the handshake's headers
            pass
        self.next_id = 0

    def send(self, message: dict):
        payload, mask = json.dumps(message).encode(), os.urandom(4)
        size = len(payload)
        header = (bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(">H", size)
                  if size < 65536 else bytes([0x81, 0x80 | 127]) + struct.pack(">Q", size))  # FIN + text, masked
        self.socket.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> dict:
        message = b""
        while True:
            first, second = self.stream.read(2)
            size = second & 0x7F
            size = struct.unpack(">H", self.stream.read(2))[0] if size == 126 else \
                struct.unpack(">Q", self.stream.read(8))[0] if size == 127 else size
            message += self.stream.read(size)
            assert first & 0x0F in (0x0, 0x1), f"unexpected websocket frame {first:#x}"  # continuation or text
            if first & 0x80:  # FIN: the message is whole
                return json.loads(message)

    def call(self, method: str, **params):
        self.next_id += 1
        self.send(dict(id=self.next_id, method=method, params=params))
        while True:
            message = self.receive()
            if message.get("id") == self.next_id:  # anything else is an event we did not ask for
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page did not {what} within {seconds} s; it shows: "
                             f"{self.evaluate('document.body.innerText')!r}")


def chromium_binary() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI must test the page: fail loudly
            pytest.fail("chromium is not installed: .ci/run installs the Debian package `chromium`")
        pytest.skip("no chromium here (apt-get install chromium)")
    return found


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "profile"
    log = open(tmp_path / "chromium.txt", "w")
    process = subprocess.Popen([chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
                                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                                f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                "--remote-debugging-address=127.0.0.1", "--window-size=820,900", "about:blank"],
                               stdout=log, stderr=log)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 60, "Chromium starts")
        port = int(port_file.read_text().split()[0])
        listing = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        listing.request("GET", "/json/list")
        targets = json.loads(listing.getresponse().read())
        listing.close()
        page = next(target for target in targets if target["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
        devtools.socket.close()
    finally:
        process.kill()
        process.wait(timeout=30)
        log.close()


def test_the_chat_page_in_a_browser(demo, browser, chat_answers):
    first, second, expected = FIRST, SECOND, chat_answers
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"http://127.0.0.1:{demo.port}/")
    browser.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent", 30,
                     "load and name the model")
    assert browser.evaluate("document.getElementById('model').textContent") == "model: demo"
    # Attach the image as a user would pick it in the file dialog.
    root = browser.call("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=file_input, files=[example("one_circle.png")])
    browser.wait_for("getComputedStyle(document.getElementById('thumb')).display === 'block'", 10, "show a thumbnail")

    def ask(question, answers):
        browser.evaluate(f"document.getElementById('question').value = {json.dumps(question)}; "
                         f"document.getElementById('ask-form').requestSubmit(); true")
        browser.wait_for(f"document.querySelectorAll('.answer.done').length === {answers}", 30, "finish the answer")
        return browser.evaluate(f"[...document.querySelectorAll('.answer')][{answers - 1}].firstChild.data"), \
            browser.evaluate(f"[...document.querySelectorAll('.answer .stats')][{answers - 1}].textContent")

    answer, stats = ask(first, 1)
    assert answer == expected[0]
    assert re.fullmatch(r"T_VE \d+\.\d+ s · S_prompt [\d.]+ tokens/s \(\d+ tokens\) · S_gen [\d.]+ tokens/s "
                        r"\(\d+ tokens\)", stats), stats
    answer, stats = ask(second, 2)
    assert answer == expected[1]
    assert f"({follow_up_length(expected[0])} tokens)" in stats  # the history and the image went with it
    assert browser.evaluate("document.querySelectorAll('.question img').length") == 1
    if os.environ.get("NANOIMP_WRITE_SCREENSHOT") == "1":
        picture = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        assert picture.startswith(b"\x89PNG")
        with open(SCREENSHOT + ".tmp", "wb") as out:
            out.write(picture)
        os.replace(SCREENSHOT + ".tmp", SCREENSHOT)
    # A refusal is shown as the server's message, and the question goes back into the box.
    browser.evaluate("document.getElementById('max-tokens').value = '0'; true")
    browser.evaluate("document.getElementById('question').value = 'And its size?'; "
                     "document.getElementById('ask-form').requestSubmit(); true")
    message = browser.wait_for("document.getElementById('error').textContent", 10, "show the refusal")
    assert message.startswith("The server said no (400): max_tokens must be at least 1"), message
    assert browser.evaluate("document.getElementById('question').value") == "And its size?"
    assert browser.evaluate("document.querySelectorAll('.answer').length") == 2
    browser.evaluate("document.getElementById('new-chat').click(); true")
    assert browser.evaluate("document.querySelectorAll('.turn').length") == 0


def test_readme_examples_work(demo):
    """The curl and openai examples of README's serve.py section, run against this server (port 8000 -> its port)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Chat in the browser and the API")[1].split("\n## ")[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)\n```", section, re.S)
    here = lambda code: code.replace("127.0.0.1:8000", f"127.0.0.1:{demo.port}")
    python, = [code for kind, code in blocks if kind == "python"]
    result = subprocess.run([sys.executable, "-c", here(python)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["The circle is red.", "It is a circle."]
    curl, = [code for kind, code in blocks if kind == "bash" and code.startswith("curl")]
    if shutil.which("curl") is None:
        pytest.skip("no curl here to run README's curl example")
    result = subprocess.run(["bash", "-c", here(curl)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout)["choices"][0]["message"]["content"] == "The circle is red."
