#!/usr/bin/env python3
"""
serve.py: Imp in the browser, and an OpenAI-compatible HTTP API, on the standard library's http.server.

    python serve.py                                  # the demo model on http://127.0.0.1:8000/
    python serve.py --model imp-v1-3b --quant int4   # Imp-3B, int4 weights

GET /                       the chat page (serve_page.html): drop an image, ask, watch the answer stream in
POST /v1/chat/completions   OpenAI's chat format: messages, temperature, top_p, max_tokens, seed, stop, stream
GET /v1/models, GET /health

One model, many clients: one worker thread owns the model and answers one request at a time; up to --queue
requests wait their turn, the next ones get 503 with Retry-After. A client that disconnects stops its generation
at the next token; a request older than --timeout seconds is cut with an error.

How an OpenAI conversation becomes Imp's prompt (imp.build_prompt, the official phi2 template): the user and
assistant messages must alternate and end with a user message; the last user message is the question and the
earlier pairs are the history. At most one image (a data: URL; nothing is ever fetched), which Imp's template puts
at the start of the first user turn, wherever it was attached. System messages are ignored: Imp's template has
its own fixed system prompt (imp.SYSTEM_PROMPT), the one it was trained with.
"""

import argparse
import base64
import binascii
import http.server
import io
import json
import math
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid

import torch

import imp
import infer

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "serve_page.html")
MiB = 1024 * 1024

EXAMPLES = """examples:
  python serve.py                                        (the demo model; open http://127.0.0.1:8000/)
  python serve.py --model imp-v1-3b --quant int4 --threads 8
  python serve.py --port 0                               (any free port; the address is printed)
  python serve.py --host 0.0.0.0 --port 8080             (reachable from other machines: no authentication!)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "What is a multimodal model?"}], "max_tokens": 64}'

Ctrl-C stops the server (exit code 0). Bad options: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Every call into the model lives here: prompt length check, generation, incremental text, timings.


class ImpReplies:
    """Every call into the model. check() may run in any request thread (it only tokenizes and preprocesses);
    reply() runs only in the worker thread, the one thread that owns the model."""

    def __init__(self, model, aspect, cache_dtype):
        self.model, self.aspect, self.cache_dtype = model, aspect, cache_dtype

    def check(self, image, question, history):
        """-> prompt length in positions (text plus image patches); PromptTooLongError if no token would fit."""
        input_ids, pixel_values = imp.prepare_inputs(self.model, image, question, history, aspect=self.aspect)
        image_positions = self.model.config.vision.num_patches - 1 if pixel_values is not None else 0  # <image> -> N
        length = input_ids.shape[1] + image_positions
        if length >= self.model.config.max_length:
            raise imp.PromptTooLongError(f"the prompt is {length} tokens with the image, but the model's context is "
                                         f"{self.model.config.max_length} tokens: shorten the question or the history")
        return length

    def reply(self, image, question, history, settings: dict, stats: dict):
        """Yield the answer as text pieces, as infer.py streams them; when the caller stops or the answer ends,
        `stats` holds the paper's Table 4 timings of this call (infer.generate_with_stats). Closing the generator
        stops the generation after this token."""
        started = time.perf_counter()
        input_ids, pixel_values = imp.prepare_inputs(self.model, image, question, history, aspect=self.aspect)
        tokens = infer.generate_with_stats(self.model, input_ids, pixel_values, stats, cache_dtype=self.cache_dtype,
                                           **settings)
        pieces = imp.text_pieces(self.model.tokenizer, tokens)
        try:
            yield from pieces
        finally:
            pieces.close()
            tokens.close()
            stats.pop("token_ids", None)
            stats.update(total_seconds=time.perf_counter() - started)

    @property
    def max_length(self) -> int:
        return self.model.config.max_length


def table4(stats: dict) -> dict:
    """Timings as the page shows them: T_VE in seconds, S_prompt and S_gen in tokens per second."""
    rate = lambda tokens, seconds: round(tokens / seconds, 2) if seconds > 0 else None
    return dict(T_VE=round(stats.get("vision_seconds", 0.0), 4),
                S_prompt=rate(stats.get("prompt_tokens", 0), stats.get("prompt_seconds", 0.0)),
                S_gen=rate(stats.get("generated_tokens", 0), stats.get("generate_seconds", 0.0)),
                **{name: round(value, 4) if isinstance(value, float) else value for name, value in stats.items()})


# ----------------------------------------------------------------------------------------------------------------
# Requests: OpenAI's JSON -> (image, question, history, settings), every problem a RequestError (HTTP 4xx).


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


def bad(message, code="invalid_request", param=None):
    return RequestError(400, message, code, param)


DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,(.*)", re.S)


def decode_image(url) -> "imp.Image.Image":
    """A data: URL -> PIL image through imp.open_image (upright, first frame, decompression bombs refused)."""
    if not isinstance(url, str):
        raise bad("image_url.url must be a string", "invalid_type", "image_url")
    found = DATA_URL.fullmatch(url.strip())
    if found is None:
        what = url.split(":", 1)[0] + ": URLs" if ":" in url[:10] else "this URL"
        raise bad(f"only data: URLs are accepted for images (data:image/png;base64,...); {what} are never fetched",
                  "invalid_image_url", "image_url")
    media_type, _, is_base64, payload = found.groups()
    if media_type and not media_type.startswith("image/"):
        raise bad(f"the data: URL holds {media_type}, not an image", "invalid_image", "image_url")
    if not is_base64:
        raise bad("the image's data: URL must be base64 (data:image/png;base64,...)", "invalid_image", "image_url")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad(f"the image's base64 does not decode ({error})", "invalid_base64", "image_url") from None
    try:
        return imp.open_image(io.BytesIO(data), "the image")
    except imp.ImageError as error:
        raise bad(str(error), "invalid_image", "image_url") from None


def message_parts(message: dict, index: int) -> tuple[str, list]:
    """A message's content -> (text, [image URLs]). Content is a string or a list of parts."""
    content, where = message.get("content"), f"messages[{index}].content"
    if isinstance(content, str):
        return content.strip(), []
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of parts", "invalid_type", where)
    texts, images = [], []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        elif kind == "image_url":
            image_url = part.get("image_url")
            images.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
        else:
            raise bad(f"{where}[{number}] must be {{\"type\": \"text\", \"text\": ...}} or {{\"type\": \"image_url\", "
                      f"\"image_url\": {{\"url\": \"data:...\"}}}}", "invalid_content", where)
    return "\n".join(text for text in texts if text), images


def conversation(messages) -> tuple:
    """OpenAI messages -> (image URL or None, question, [(question, answer)] history)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "invalid_messages", "messages")
    turns, image_urls = [], []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            continue  # Imp's template has its own fixed system prompt
        if role not in ("user", "assistant"):
            raise bad(f"messages[{index}].role must be system, user or assistant (got {role!r})", "invalid_role",
                      "messages")
        text, images = message_parts(message, index)
        if images and role != "user":
            raise bad(f"messages[{index}]: only user messages can carry an image", "invalid_content", "messages")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise bad(f"messages[{index}] is a {role} message where a {expected} message was expected: user and "
                      f"assistant messages must alternate, starting with user", "invalid_messages", "messages")
        if not text:
            raise bad(f"messages[{index}] has no text", "empty_message", "messages")
        turns.append(text)
        image_urls += images
    if len(turns) % 2 == 0:
        raise bad("the last message must be a user message (the question)", "invalid_messages", "messages")
    if len(image_urls) > 1:
        raise bad(f"{len(image_urls)} images in the conversation; Imp answers about one image", "too_many_images",
                  "messages")
    history = list(zip(turns[0:-1:2], turns[1:-1:2]))
    return (image_urls[0] if image_urls else None), turns[-1], history


def number(body, name, kind, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise bad(f"{name} must be a{'n integer' if kind is int else ' number'}", "invalid_type", name)
    if not math.isfinite(value):
        raise bad(f"{name} must be finite", "invalid_value", name)
    return kind(value)


def generation_settings(body: dict) -> dict:
    """The sampling settings; defaults are infer.py's (greedy, the official setting; 256 new tokens at most)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    settings = dict(max_new_tokens=number(dict(max_tokens=max_tokens), "max_tokens", int, 256),
                    temperature=number(body, "temperature", float, 0.0), top_p=number(body, "top_p", float, 1.0),
                    top_k=number(body, "top_k", int, 0), seed=number(body, "seed", int, None))
    try:
        infer.check_settings(settings, "")
    except infer.InputError as error:
        raise bad(str(error).replace("max_new_tokens", "max_tokens"), "invalid_value") from None
    if number(body, "n", int, 1) != 1:
        raise bad("n must be 1: one answer per request", "invalid_value", "n")
    return settings


def stop_strings(body: dict) -> list:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop must be a non-empty string or a list of up to 4 of them", "invalid_type", "stop")
    return stops


def parse_request(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad(f"the body is not valid JSON ({error})", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object", "invalid_json")
    image_url, question, history = conversation(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "invalid_type", "stream")
    return dict(image=decode_image(image_url) if image_url is not None else None, question=question,
                history=history, settings=generation_settings(body), stops=stop_strings(body), stream=stream)


# ----------------------------------------------------------------------------------------------------------------
# The worker: one thread owns the model; requests wait in a bounded queue.


class Busy(Exception):
    pass


class Job:
    """One request on its way through the worker. The worker puts events on `events`: ("text", piece) while the
    answer grows, then ("done", result) or ("error", RequestError). `cancelled` is set by the request's thread."""

    def __init__(self, request: dict, deadline: float):
        self.request, self.deadline = request, deadline
        self.events, self.cancelled = queue.Queue(), threading.Event()
        self.arrived = time.perf_counter()


class AnswerText:
    """Streamed pieces -> what the client sees: cut just before the first stop string, with trailing whitespace
    (and any beginning of a stop string) held back until more text follows, so that an answer that ends by itself
    ends stripped, like Imp.answer."""

    def __init__(self, stops):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        found = [i for i in (self.text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
            return self.finish()
        held = len(self.text) - len(self.text.rstrip())
        for stop in self.stops:  # the longest end of the text that could grow into this stop string
            held = max([held] + [k for k in range(1, len(stop)) if self.text.endswith(stop[:k])])
        return self.take(len(self.text) - held)

    def finish(self) -> str:
        """The rest: all of it before a stop string (as OpenAI cuts), else without trailing whitespace."""
        return self.take(len(self.text) if self.stopped else len(self.text.rstrip()))

    def take(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


class Worker(threading.Thread):
    def __init__(self, replies: ImpReplies, queue_size: int):
        super().__init__(name="model", daemon=True)  # daemon: Ctrl-C does not wait for a generation to end
        self.replies, self.jobs = replies, queue.Queue(maxsize=queue_size)
        self.current, self.served, self.cancelled, self.stopping = None, 0, 0, False
        self.seconds_per_request = 1.0  # a running mean, for Retry-After

    def submit(self, job: Job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy() from None

    def retry_after(self) -> int:
        return max(1, math.ceil(self.seconds_per_request * (self.jobs.qsize() + 1)))

    def stop(self, seconds: float = 30):
        """Cancel the running and the waiting requests, and wait for the worker to leave the model: a thread still
        inside torch when the interpreter exits can abort the process."""
        self.stopping = True
        while True:
            job = self.current
            if job is not None:
                job.cancelled.set()
            try:
                self.jobs.get_nowait().cancelled.set()
            except queue.Empty:
                break
        self.jobs.put(None)  # wakes a worker that waits for work
        self.join(seconds)
        return not self.is_alive()

    def run(self):
        while True:
            job = self.jobs.get()
            if job is None or self.stopping:
                return
            if job.cancelled.is_set():  # its client left, or its time ran out, while it waited
                self.cancelled += 1
                continue
            self.current = job
            started = time.perf_counter()
            try:
                self.answer(job)
            except Exception as error:  # a bug must not kill the worker: the request gets a 500, the next one runs
                job.events.put(("error", RequestError(500, f"internal error: {type(error).__name__}: {error}",
                                                      "internal_error", kind="server_error")))
            self.current = None
            self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * (time.perf_counter() - started)

    def answer(self, job: Job):
        request, stats = job.request, {}
        text = AnswerText(request["stops"])
        pieces = self.replies.reply(request["image"], request["question"], request["history"], request["settings"],
                                    stats)
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    self.cancelled += 1
                    return
                shown = text.feed(piece)
                if shown:
                    job.events.put(("text", shown))
                if text.stopped:
                    break
        except imp.PromptTooLongError as error:  # check() let it through: only if the settings changed the length
            job.events.put(("error", RequestError(400, str(error), "context_length_exceeded", "messages")))
            return
        except imp.NotFiniteError as error:  # damaged weights or a float16 cache past its range: not a bug of ours
            job.events.put(("error", RequestError(500, str(error), "model_error", kind="server_error")))
            return
        finally:
            pieces.close()  # stops the generation and fills stats
        rest = text.finish()
        if rest:
            job.events.put(("text", rest))
        limit = min(request["settings"]["max_new_tokens"], self.replies.max_length - stats["prompt_tokens"])
        finish = "length" if not text.stopped and stats["generated_tokens"] >= limit else "stop"
        stats["queue_seconds"] = time.perf_counter() - job.arrived - stats["total_seconds"]  # waiting + checks
        self.served += 1
        job.events.put(("done", dict(finish_reason=finish, prompt_tokens=stats["prompt_tokens"],
                                     completion_tokens=stats["generated_tokens"], stats=table4(stats))))


# ----------------------------------------------------------------------------------------------------------------
# HTTP: the routes, one thread per connection (ThreadingHTTPServer); all of them share one App.


class ClientGone(Exception):
    pass


class App:
    def __init__(self, worker: Worker, model_id: str, page: bytes, timeout: float, max_body: int):
        self.worker, self.model_id, self.page, self.timeout, self.max_body = worker, model_id, page, timeout, max_body
        self.created = int(time.time())


PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src "
                "'unsafe-inline'; img-src data: blob:; connect-src 'self'", "X-Content-Type-Options": "nosniff"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for the JSON answers; a stream closes its connection at the end
    server_version = "nanoImp"
    timeout = 60  # seconds a silent client may hold its connection (socket timeout)

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # -- routes ----------------------------------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self.send(200, self.app.page, "text/html; charset=utf-8", PAGE_HEADERS)
        elif path == "/health":
            worker = self.app.worker
            self.send_json(200, dict(status="ok", model=self.app.model_id, busy=worker.current is not None,
                                     waiting=worker.jobs.qsize(), queue_size=worker.jobs.maxsize,
                                     served=worker.served, cancelled=worker.cancelled))
        elif path == "/v1/models":
            self.send_json(200, dict(object="list", data=[dict(id=self.app.model_id, object="model",
                                                               created=self.app.created, owned_by="nanoImp")]))
        elif path == "/v1/chat/completions":
            self.refuse(RequestError(405, "use POST for /v1/chat/completions", "method_not_allowed"))
        else:
            self.refuse(RequestError(404, f"no such route: GET {path} (try /, /health, /v1/models, "
                                          f"POST /v1/chat/completions)", "not_found"))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path != "/v1/chat/completions":
            self.close_connection = True  # its body stays unread
            return self.refuse(RequestError(404, f"no such route: POST {path} (try POST /v1/chat/completions)",
                                            "not_found"))
        try:
            self.chat_completion()
        except RequestError as error:
            self.refuse(error)
        except ClientGone:
            self.close_connection = True
        except Exception as error:  # a bug: the client gets a 500 and the server goes on
            self.log_message("internal error: %r", error)
            self.refuse(RequestError(500, f"internal error: {type(error).__name__}: {error}", "internal_error",
                                     kind="server_error"))

    def refuse_method(self):
        self.close_connection = True
        self.refuse(RequestError(405, f"method {self.command} is not allowed here", "method_not_allowed"))

    do_PUT = do_DELETE = do_PATCH = refuse_method

    # -- one chat completion ---------------------------------------------------------------------------------------

    def chat_completion(self):
        arrived = time.perf_counter()
        request = parse_request(self.read_body())
        try:
            self.app.worker.replies.check(request["image"], request["question"], request["history"])
        except imp.PromptTooLongError as error:
            raise RequestError(400, str(error), "context_length_exceeded", "messages") from None
        job = Job(request, deadline=arrived + self.app.timeout)
        try:
            self.app.worker.submit(job)
        except Busy:
            retry = self.app.worker.retry_after()
            raise RequestError(503, f"the server is busy ({self.app.worker.jobs.maxsize} requests already wait for "
                                    f"the model); retry in {retry} s", "server_busy", kind="server_error") from None
        try:
            (self.stream_answer if request["stream"] else self.whole_answer)(job)
        finally:
            job.cancelled.set()  # whatever happened here, the worker stops (or skips) this job

    def next_event(self, job: Job):
        """The worker's next event for this job; meanwhile watch for the client leaving and for --timeout."""
        while True:
            left = job.deadline - time.perf_counter()
            try:
                return job.events.get(timeout=max(0.0, min(0.1, left)))  # 0.1 s: how soon a departure is noticed
            except queue.Empty:
                pass
            if self.client_gone():
                raise ClientGone()
            if time.perf_counter() >= job.deadline:
                return "error", RequestError(504, f"the request took longer than the server's --timeout of "
                                                  f"{self.app.timeout:g} s and was cut", "timeout", kind="timeout")

    def client_gone(self) -> bool:
        """True once the client has closed its end (readable, yet nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def whole_answer(self, job: Job):
        pieces = []
        while True:
            kind, value = self.next_event(job)
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
            else:
                return self.send_json(200, self.completion("chat.completion", dict(
                    index=0, message=dict(role="assistant", content="".join(pieces)),
                    finish_reason=value["finish_reason"]), value))

    def stream_answer(self, job: Job):
        self.close_connection = True  # the stream's end is the connection's end
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                            ("Connection", "close"), ("X-Accel-Buffering", "no")):
            self.send_header(name, value)
        self.end_headers()
        identity = dict(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()))
        chunk = lambda delta, finish=None, **extra: self.completion("chat.completion.chunk", dict(
            index=0, delta=delta, finish_reason=finish), extra.get("done"), identity)
        try:
            self.event(chunk(dict(role="assistant", content="")))
            while True:
                kind, value = self.next_event(job)
                if kind == "text":
                    self.event(chunk(dict(content=value)))
                elif kind == "error":
                    self.event(value.body())
                    break
                else:
                    self.event(chunk({}, value["finish_reason"], done=value))
                    break
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            raise ClientGone() from None

    def completion(self, kind: str, choice: dict, done: dict | None, identity=None) -> dict:
        identity = identity or dict(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()))
        body = dict(identity, object=kind, model=self.app.model_id, choices=[choice])
        if done is not None:
            tokens = dict(prompt_tokens=done["prompt_tokens"], completion_tokens=done["completion_tokens"])
            body.update(usage=dict(tokens, total_tokens=sum(tokens.values())), nanoimp_stats=done["stats"])
        return body

    # -- bytes in, bytes out ---------------------------------------------------------------------------------------

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is needed (chunked bodies are not accepted)",
                               "length_required")
        if not length.isdigit():
            self.close_connection = True
            raise bad(f"Content-Length {length!r} is not a number", "invalid_header")
        if int(length) > self.app.max_body:
            self.close_connection = True  # the body stays unread
            raise RequestError(413, f"the body is {int(length) / MiB:.1f} MiB; this server accepts up to "
                                    f"{self.app.max_body / MiB:g} MiB (--max-body-mb)", "request_too_large")
        return self.rfile.read(int(length))

    def event(self, body: dict):
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def refuse(self, error: RequestError):
        headers = {"Retry-After": str(self.app.worker.retry_after())} if error.status == 503 else {}
        if error.status == 405:
            headers["Allow"] = "POST" if self.path.startswith("/v1/chat") else "GET"
        try:
            self.send_json(error.status, error.body(), headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_json(self, status: int, body: dict, headers=None):
        self.send(status, json.dumps(body, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def send(self, status: int, data: bytes, content_type: str, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open connections
    request_queue_size = 128  # the listen backlog; socketserver's 5 resets connections when many clients arrive at once

    def __init__(self, host, port, app: App):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.app = app


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_arguments(argv):
    parser = infer.Parser(prog="serve.py", description="Chat with Imp (arXiv 2405.12107) in the browser, or through "
                          "an OpenAI-compatible HTTP API.", epilog=EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="DIR", help="Imp folder (default: $IMP_MODEL, else checkpoints/demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; there is no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (printed)")
    parser.add_argument("--dtype", choices=infer.DTYPES, help="weights' dtype (default: bfloat16 if the CPU has "
                        "native bfloat16, else float32)")
    parser.add_argument("--quant", choices=("int8", "int4"), help="quantize the weights while loading (quant.py)")
    parser.add_argument("--int8-activations", action="store_true", help="with a quantized model: int8 "
                        "activations, for decode (kernels.c) and/or prefill and vision (see infer.py --help)")
    parser.add_argument("--kv-cache", choices=("auto", *infer.DTYPES), default="auto", help="dtype of the "
                        "attention cache (default auto, as infer.py)")
    parser.add_argument("--aspect", choices=("square", "pad"), help="squash images to a square, or pad them to one "
                        "first (default: the model's config)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--queue", type=int, metavar="N", default=8, help="requests that may wait while one is "
                        "answered (default 8); more get 503 with Retry-After")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", default=300, help="cut a request after this "
                        "long, waiting included (default 300)")
    parser.add_argument("--max-body-mb", type=float, metavar="MB", default=20, help="largest request body "
                        "(default 20 MiB; an image travels base64-encoded, 4/3 of its file size)")
    args = parser.parse_args(argv)
    args.image_size = None  # infer.load_model checks --image-size; the server always uses the trained size
    if not 0 <= args.port <= 65535:
        raise infer.InputError(f"--port {args.port}: must be 0..65535")
    for name in ("threads", "queue"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise infer.InputError(f"--{name} must be at least 1")
    if not args.timeout > 0 or not args.max_body_mb > 0:
        raise infer.InputError("--timeout and --max-body-mb must be positive")
    return args


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # `kill PID` stops as cleanly as Ctrl-C


def run(argv) -> int:
    args = parse_arguments(argv)
    try:
        page = open(PAGE, "rb").read()
    except OSError as error:
        raise infer.InputError(f"{PAGE}: cannot read the chat page ({error.strerror})") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    path = infer.resolve_model_path(args)
    model, load_seconds = infer.load_model(args, path)  # sets args.cache_dtype from --kv-cache
    worker = Worker(ImpReplies(model, args.aspect, args.cache_dtype), args.queue)
    app = App(worker, os.path.basename(os.path.realpath(path)), page, args.timeout, int(args.max_body_mb * MiB))
    try:
        server = Server(args.host, args.port, app)
    except OSError as error:
        raise infer.InputError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error})") from None
    worker.start()
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serve.py: {app.model_id} loaded in {load_seconds:.1f} s; chat on http://{shown}:{port}/ , API on "
          f"http://{shown}:{port}/v1 (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (`&`)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    server.server_close()
    stopped = worker.stop()
    print(f"serve.py: stopped after {worker.served} answers", flush=True)
    if not stopped:  # still in one long forward pass: leave without waiting for it
        os._exit(infer.EXIT_OK)
    return infer.EXIT_OK


def main(argv=None) -> int:
    try:
        return run(argv)
    except (infer.InputError, imp.CheckpointError) as error:
        print(f"serve.py: error: {error}", file=sys.stderr)
        return infer.EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        print("serve.py: stopped", flush=True)
        return infer.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
