"""Relay decoding with the teacher in-process vs the same weights behind ``relaypipe serve``.

    .venv/bin/python scripts/bench_http_teacher.py MODEL_DIR N_PROMPTS ROUTER_P MAX_NEW_TOKENS
    .venv/bin/python scripts/bench_http_teacher.py data/models/smollm2 8 0.2 24

Loads MODEL_DIR twice (student and in-process teacher), starts
``python -m relaypipe.cli serve --model MODEL_DIR`` as a separate process on a free loopback
port, decodes N chat-framed arith prompts with the random router (greedy, seed 0) through both
teachers, twice each after a warm-up, and prints one JSON line: wall seconds per repeat,
hand-offs, teacher tokens, and whether both produced identical tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import torch

from relaypipe.models import load_model
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import HTTPBackend
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.tasks.arith import ArithSpec, generate
from relaypipe.tasks.base import format_prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(1)
    raise SystemExit(f"server at {url} did not come up in {seconds:.0f} s")


def main(model: str, n: int, p: float, max_new: int) -> dict:
    torch.set_num_threads(1)  # the server process gets the other core
    port = free_port()
    cmd = [sys.executable, "-m", "relaypipe.cli", "serve", "--model", model, "--name", "t"]
    cmd += ["--port", str(port), "--device", "cpu", "--api-key-env", ""]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        student, tok = load_model(model, device="cpu")
        teacher, _ = load_model(model, device="cpu")
        problems = generate(ArithSpec(difficulty=1, terms=3), n, 0, "eval")
        prompts = [
            tok(format_prompt(q.question, tok, chat_template=True), add_special_tokens=False)
            for q in problems
        ]
        prompts = [x.input_ids for x in prompts]
        cfg = RelayConfig(mode="random_router", router_p=p, max_new_tokens=max_new, seed=0)
        local = RelayDecoder(TransformersBackend(student), TransformersBackend(teacher), tok)
        local.decode(prompts[:2], cfg)  # warm-up
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        res: dict = {"n": n, "router_p": p, "max_new_tokens": max_new}
        tokens = {}
        with HTTPBackend(url, "t", tok, timeout_s=300) as http_teacher:
            remote = RelayDecoder(TransformersBackend(student), http_teacher, tok)
            remote.decode(prompts[:2], cfg)
            for _ in range(2):
                for name, dec in (("in_process", local), ("http", remote)):
                    t = time.perf_counter()
                    traces = dec.decode(prompts, cfg)
                    res.setdefault(f"{name}_s", []).append(round(time.perf_counter() - t, 2))
                    tokens[name] = [x.token_ids for x in traces]
                    res[f"{name}_handoffs"] = sum(len(x.handoffs) for x in traces)
                    res[f"{name}_teacher_tokens"] = sum(x.n_teacher for x in traces)
        res["identical"] = tokens["in_process"] == tokens["http"]
        return res
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    model_dir, n_prompts, router_p, max_new_tokens = sys.argv[1:]
    print(json.dumps(main(model_dir, int(n_prompts), float(router_p), int(max_new_tokens))))
