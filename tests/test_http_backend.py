"""HTTPBackend against a real loopback server that misbehaves on command.

The fault server is a stdlib ``ThreadingHTTPServer`` rather than an ASGI app because only a
raw socket can reset a connection or cut a body short. Each request is tagged by the first
character of its prompt; the test scripts a queue of actions per tag ("500", "reset",
"slow:0.6", ...; "ok" when the queue is empty) and the server logs every action it took, so
the tests can check both the results and how many attempts each request needed.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Hashable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from relaypipe.relay.backends import GenRequest, GenResult
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import (
    HTTPBackend,
    TeacherConfigError,
    TeacherUnavailable,
    completions_url,
)
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import Source, StopReason
from relaypipe.relay.transformers_backend import TransformersBackend

FAST = {"timeout_s": 0.3, "backoff_s": 0.01, "max_retries": 2}


class FaultServer:
    """A fake completions server: answers ``"t" * max_tokens`` unless scripted otherwise."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.script: dict[str, deque[str]] = defaultdict(deque)
        self.actions: list[tuple[str, str]] = []  # (tag, action) in arrival order
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    owner.handle(self, body)
                except OSError:  # the client gave up (timeout) while we were slow
                    self.close_connection = True
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def counts(self) -> Counter:
        return Counter(tag for tag, _ in self.actions)

    def _tag(self, prompt) -> str:
        return prompt[0] if isinstance(prompt, str) else self.tok.decode(prompt[:1])

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        tag = self._tag(body["prompt"])
        with self.lock:
            self.bodies.append(body)
            action = self.script[tag].popleft() if self.script[tag] else "ok"
            self.actions.append((tag, action))
        if action.startswith("slow:"):
            time.sleep(float(action.split(":")[1]))
            action = "ok"
        n = body["max_tokens"]
        t_id = self.tok.convert_tokens_to_ids("t")
        eos = self.tok.eos_token_id
        choice = {"index": 0, "text": "t" * n, "finish_reason": "length", "token_ids": [t_id] * n}
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        if action == "ok_eos_dropped":  # "tt" then EOS, which the server leaves out
            choice.update(text="tt", finish_reason="stop", token_ids=[t_id, t_id])
        elif action == "ok_eos":
            choice.update(text="tt", finish_reason="stop", token_ids=[t_id, t_id, eos])
        elif action == "ok_text_only":
            choice.update(text="tt", finish_reason="stop")
            del choice["token_ids"]
        elif action == "ok_cached":
            usage["prompt_tokens_details"] = {"cached_tokens": 3}
        elif action.startswith("ok_stop"):  # "tt" then the (first) stop id asked for
            stop = body["stop_token_ids"][0]
            ids = {
                "ok_stop": [t_id, t_id, stop],  # as vLLM: the stop id kept, named in stop_reason
                "ok_stop_dropped": [t_id, t_id],  # a server that leaves it out
                "ok_stop_ignored": [t_id, t_id, stop, t_id, t_id],  # ignores stop_token_ids
                "ok_stop_at_length": [t_id] * (n - 1) + [stop],  # vLLM says "length" here
            }[action]
            finish = "length" if action in ("ok_stop_ignored", "ok_stop_at_length") else "stop"
            reason = stop if finish == "stop" else None
            choice.update(text="tt", finish_reason=finish, stop_reason=reason, token_ids=ids)
        if action.startswith("ok"):
            self._send(h, 200, {"choices": [choice], "usage": usage})
        elif action.isdigit():
            self._send(h, int(action), {"error": {"message": f"scripted {action}"}})
        elif action == "malformed":
            self._send_raw(h, 200, b'{"choices": [oops')
        elif action == "empty_choices":
            self._send(h, 200, {"choices": []})
        elif action == "truncated":  # promise 500 bytes, send 20, hang up
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "500")
            h.end_headers()
            h.wfile.write(json.dumps({"choices": [choice]}).encode()[:20])
            h.wfile.flush()
            h.close_connection = True
        elif action == "reset":  # RST: close with SO_LINGER 0 and nothing sent
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.rfile.close()
            h.wfile.close()
            h.connection.close()
            h.close_connection = True
        elif action == "close":  # orderly close without a response
            h.close_connection = True
        else:
            raise AssertionError(f"unknown action {action}")

    @staticmethod
    def _send(h, status: int, obj: dict) -> None:
        FaultServer._send_raw(h, status, json.dumps(obj).encode())

    @staticmethod
    def _send_raw(h, status: int, data: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status == 429:
            h.send_header("Retry-After", "0")
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def server(tokenizer) -> Iterator[FaultServer]:
    srv = FaultServer(tokenizer)
    yield srv
    srv.close()


@pytest.fixture
def backend_factory(server, tokenizer):
    made: list[HTTPBackend] = []

    def make(**kw) -> HTTPBackend:
        b = HTTPBackend(server.url, "fake", tokenizer, **{**FAST, **kw})
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def reqs(tokenizer, tags: str, n: int = 4) -> list[GenRequest]:
    return [
        GenRequest(
            key=(0, i),
            context=tokenizer(f"{tag} Q", add_special_tokens=False).input_ids,
            max_new_tokens=n,
        )
        for i, tag in enumerate(tags)
    ]


def t_ids(tokenizer, n: int) -> list[int]:
    return [tokenizer.convert_tokens_to_ids("t")] * n


def test_completions_url_accepts_both_spellings():
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


def test_transient_faults_are_retried_and_every_request_is_answered_right(
    server, backend_factory, tokenizer
):
    script = {
        "a": ["500", "503"],
        "b": ["429"],
        "c": ["reset"],
        "d": ["close"],
        "e": ["malformed"],
        "f": ["truncated"],
        "g": ["slow:0.6"],  # past the 0.3 s timeout
        "h": ["empty_choices"],
    }
    for tag, actions in script.items():
        server.script[tag].extend(actions)
    backend = backend_factory(concurrency=8, on_failure="fail")
    results = backend.generate(reqs(tokenizer, "abcdefghi"))
    for r in results:
        assert (r.tokens, r.finish, r.error) == (t_ids(tokenizer, 4), "length", None)
    expected = {tag: len(a) + 1 for tag, a in script.items()} | {"i": 1}
    assert server.counts() == expected
    assert server.max_in_flight > 1  # the batch really went out concurrently


def test_persistent_failure_with_skip_is_recorded_per_request(server, backend_factory, tokenizer):
    server.script["a"].extend(["500"] * 3)
    server.script["c"].extend(["400"])  # a 4xx other than 429 is not retried
    backend = backend_factory(on_failure="skip")
    a, b, c = backend.generate(reqs(tokenizer, "abc"))
    assert (a.tokens, a.finish) == ([], "error")
    assert "HTTP 500: scripted 500" in a.error and "3 attempt" in a.error
    assert server.url in a.error
    assert (b.tokens, b.finish) == (t_ids(tokenizer, 4), "length")
    assert (c.finish, "HTTP 400" in c.error, "1 attempt" in c.error) == ("error", True, True)
    assert server.counts() == {"a": 3, "b": 1, "c": 1}


def test_persistent_failure_with_fail_raises_a_clear_error(server, backend_factory, tokenizer):
    server.script["b"].extend(["503"] * 3)
    backend = backend_factory(on_failure="fail")
    with pytest.raises(TeacherUnavailable) as info:
        backend.generate(reqs(tokenizer, "abc"))
    err = info.value
    assert server.url in str(err) and "(0, 1)" in str(err) and "HTTP 503" in str(err)
    assert err.key == (0, 1) and err.attempts == 3 and set(err.failures) == {(0, 1)}
    assert server.counts() == {"a": 1, "b": 3, "c": 1}  # the others were still answered


def test_timeouts_exhaust_retries_but_a_slow_in_time_server_is_fine(
    server, backend_factory, tokenizer
):
    server.script["a"].extend(["slow:0.5", "slow:0.5"])
    server.script["b"].extend(["slow:0.15"])  # within the timeout: one attempt, a good answer
    backend = backend_factory(on_failure="skip", max_retries=1)
    t0 = time.perf_counter()
    a, b = backend.generate(reqs(tokenizer, "ab"))
    assert a.finish == "error" and "Timeout" in a.error and "2 attempt" in a.error
    assert (b.tokens, b.finish) == (t_ids(tokenizer, 4), "length")
    assert server.counts()["b"] == 1
    assert time.perf_counter() - t0 < 1.5  # two 0.3 s timeouts plus backoff, not the 0.5 s sleeps


@pytest.mark.parametrize("status", ["401", "404"])
def test_misconfiguration_raises_even_with_skip(server, backend_factory, tokenizer, status):
    server.script["a"].append(status)
    with pytest.raises(TeacherConfigError, match=f"HTTP {status}"):
        backend_factory(on_failure="skip").generate(reqs(tokenizer, "ab"))
    assert server.counts()["a"] == 1


def test_eos_is_made_visible_and_accounting_uses_what_came_back(server, backend_factory, tokenizer):
    for tag, action in zip(
        "abcd", ["ok_eos_dropped", "ok_eos", "ok_text_only", "ok_cached"], strict=True
    ):
        server.script[tag].append(action)
    eos = tokenizer.eos_token_id
    tt = t_ids(tokenizer, 2)
    a, b, c, d = backend_factory().generate(reqs(tokenizer, "abcd", n=5))
    assert (a.tokens, a.finish) == ([*tt, eos], "eos")  # appended: the server dropped it
    assert (b.tokens, b.finish) == ([*tt, eos], "eos")  # not doubled
    assert (c.tokens, c.finish) == ([*tt, eos], "eos")  # re-tokenized text
    assert (d.tokens, d.finish) == (t_ids(tokenizer, 5), "length")
    assert a.prefill_tokens == 3 and d.prefill_tokens == 0  # "d Q" is 3 tokens, 3 cached
    assert all(body["return_token_ids"] is True for body in server.bodies)


def test_eos_is_not_appended_past_max_new_tokens(server, backend_factory, tokenizer):
    server.script["a"].append("ok_eos_dropped")
    (a,) = backend_factory().generate(reqs(tokenizer, "a", n=2))
    assert (a.tokens, a.finish) == (t_ids(tokenizer, 2), "eos")


@pytest.mark.parametrize(
    "action", ["ok_stop", "ok_stop_dropped", "ok_stop_ignored", "ok_stop_at_length"]
)
def test_a_stop_token_is_kept_however_the_server_reports_it(
    server, backend_factory, tokenizer, action
):
    close = tokenizer.convert_tokens_to_ids("</call>")
    server.script["a"].append(action)
    n = 3 if action == "ok_stop_at_length" else 6
    (a,) = backend_factory().generate(reqs(tokenizer, "a", n=n), stop_token_ids=frozenset({close}))
    assert (a.tokens, a.finish) == ([*t_ids(tokenizer, 2), close], "stop")
    assert server.bodies[0]["stop_token_ids"] == [close]


def test_a_stop_reason_that_is_no_stop_token_is_an_eos(server, backend_factory, tokenizer):
    server.script["a"].append("ok_eos_dropped")  # finish "stop", no stop_reason
    close = tokenizer.convert_tokens_to_ids("</call>")
    (a,) = backend_factory().generate(reqs(tokenizer, "a", n=6), stop_token_ids=frozenset({close}))
    assert (a.tokens, a.finish) == ([*t_ids(tokenizer, 2), tokenizer.eos_token_id], "eos")


def test_logit_bias_is_sent_within_openais_range(server, backend_factory, tokenizer):
    backend = backend_factory()
    assert backend.supports_logit_bias
    (r,) = reqs(tokenizer, "a")
    r.logit_bias = {5: 2.5, 6: math.inf, 7: -math.inf, 8: -1e9}
    backend.generate([r])
    assert server.bodies[0]["logit_bias"] == {"5": 2.5, "6": 100.0, "7": -100.0, "8": -100.0}
    r.logit_bias = {5: math.nan}
    with pytest.raises(ValueError, match=r"logit_bias\[5\]"):
        backend.generate([r])
    assert len(server.bodies) == 1  # refused before anything was sent


def test_a_student_needs_ids_and_says_which_side_failed(server, backend_factory, tokenizer):
    with pytest.raises(ValueError, match="a student server needs prompt_format='tokens'"):
        backend_factory(role="student", on_failure="skip")
    student = backend_factory(role="student")
    server.script["a"].append("ok_text_only")
    with pytest.raises(TeacherConfigError, match=r"student server 'fake' .*without token_ids") as e:
        student.generate(reqs(tokenizer, "a"))
    assert e.value.role == "student" and e.value.attempts == 1
    server.script["b"].extend(["500"] * 3)
    with pytest.raises(TeacherUnavailable, match=r"^student server .* 3 attempt\(s\): HTTP 500"):
        student.generate(reqs(tokenizer, "b"))


def test_text_format_sends_text_and_retokenizes(server, backend_factory, tokenizer):
    (a,) = backend_factory(prompt_format="text").generate(reqs(tokenizer, "a", n=3))
    (body,) = server.bodies
    assert body["prompt"] == "a Q" and "return_token_ids" not in body
    assert (a.tokens, a.finish) == (t_ids(tokenizer, 3), "length")


def test_seeds_come_from_each_requests_generator(server, backend_factory, tokenizer):
    backend = backend_factory()

    def seeds(sampling: Sampling) -> list[int | None]:
        server.bodies.clear()
        rs = reqs(tokenizer, "ab")
        for i, r in enumerate(rs):
            r.generator = torch.Generator().manual_seed(10 + i)
        backend.generate(rs, sampling=sampling)
        backend.generate(rs, sampling=sampling)  # the generators have moved on
        by_tag = sorted(server.bodies, key=lambda b: (b["prompt"][0], server.bodies.index(b)))
        return [b.get("seed") for b in by_tag]

    hot = Sampling(temperature=1.0)
    first, again = seeds(hot), seeds(hot)
    assert first == again and len(set(first)) == 4  # reproducible, distinct per call
    assert seeds(Sampling()) == [None] * 4  # greedy: no seed sent


def test_api_key_is_sent(server, backend_factory, tokenizer, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sekret")
    seen = []
    orig = server.handle
    server.handle = lambda h, body: (seen.append(h.headers["Authorization"]), orig(h, body))
    backend_factory(api_key_env="TEACHER_KEY").generate(reqs(tokenizer, "a"))
    assert seen == ["Bearer sekret"]


# --------------------------------------------------------------------------- with the decoder
class ScriptedStudent:
    """Per request (by batch position), the next chunk of its script; EOS when it runs out."""

    def __init__(self, tokenizer, scripts: dict[int, list[str]]):
        self.tok = tokenizer
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])
        self.queues = {
            i: [tokenizer(c, add_special_tokens=False).input_ids for c in s]
            for i, s in scripts.items()
        }

    def generate(
        self, requests: Sequence[GenRequest], *, stop_token_ids=frozenset(), sampling=Sampling()
    ) -> list[GenResult]:
        out = []
        for r in requests:
            q = self.queues[r.key[1]]
            chunk = q.pop(0) if q else [self.tok.eos_token_id]
            finish = "eos" if chunk[-1] in self.eos_token_ids else "stop"
            out.append(GenResult(tokens=chunk, finish=finish, prefill_tokens=len(r.context)))
        return out

    def release(self, key: Hashable) -> None:
        pass


def test_relay_records_teacher_errors_and_the_student_carries_on(
    server, backend_factory, tokenizer
):
    server.script["a"].extend(["500"] * 3)  # request 0's hand-off fails for good
    server.script["b"].extend(["reset"])  # request 1's first attempt is reset, then fine
    student = ScriptedStudent(
        tokenizer, {0: ["12<call>3</call>", "9<eos>"], 1: ["7<call>2</call>", "8<eos>"]}
    )
    dec = RelayDecoder(student, backend_factory(on_failure="skip"), tokenizer)
    bad, good = dec.decode_text(["a Q", "b Q"], RelayConfig(max_new_tokens=32))
    assert tokenizer.decode(bad.token_ids) == "12<call>3</call>9<eos>"
    (event,) = bad.events
    assert event.kind == "teacher_error" and "HTTP 500" in event.detail
    assert [(h.granted, h.delivered) for h in bad.handoffs] == [(3, 0)]
    assert bad.stop_reason == StopReason.STUDENT_EOS
    assert tokenizer.decode(good.token_ids) == "7<call>2</call>tt8<eos>"
    assert not good.events and good.sources.count(Source.TEACHER) == 2


def test_relay_with_a_real_student_and_a_flaky_teacher_loses_nothing(
    server, backend_factory, tokenizer, tiny_models
):
    """Random routing on a tiny model; request 'a' never gets help, 'b' only after retries."""
    server.script["a"].extend(["500"] * 100)
    server.script["b"].extend(["truncated", "malformed"])
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=20, seed=1)
    student = TransformersBackend(tiny_models[0])
    dec = RelayDecoder(student, backend_factory(on_failure="skip"), tokenizer, cfg)
    traces = dec.decode_text(["a Q: 1+2\nA: ", "b Q: 3\nA: ", "c Q: 4\nA: "])
    a, b, c = traces
    assert a.handoffs and all(h.delivered == 0 for h in a.handoffs)
    assert len(a.events) == len(a.handoffs) and {e.kind for e in a.events} == {"teacher_error"}
    assert a.n_teacher == 0
    for tr in (b, c):
        assert not tr.events and tr.handoffs
        assert sum(h.delivered for h in tr.handoffs) == tr.n_teacher > 0
    for tr in traces:
        assert tr.stop_reason in (StopReason.MAX_NEW_TOKENS, StopReason.STUDENT_EOS)
        assert len(tr.sources) == len(tr.token_ids)
