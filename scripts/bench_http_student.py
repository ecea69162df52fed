"""Relay decoding with both models in-process vs both behind ``relaypipe serve``.

    .venv/bin/python scripts/bench_http_student.py [N_PROMPTS] [ROUTER_P] [MAX_NEW_TOKENS]
    .venv/bin/python scripts/bench_http_student.py 16 0.2 32

Builds the micro preset's student and teacher shapes (presets/micro.yaml, untrained, seeded;
the char tokenizer), saves them, and starts ``python -m relaypipe.cli serve --model DIR`` for
each as a separate process on a free loopback port. Then decodes N arith prompts with the
random router (greedy, seed 0; an untrained student makes no calls, the router hands over
anyway, so both sides take turns) at decoder batch 1 (one prompt at a time) and batch N,
with the student and the teacher in-process, the teacher alone over HTTP, and both over
HTTP: twice each after a warm-up. Prints one JSON line: wall seconds per repeat, student
rounds, hand-offs, teacher tokens, and whether every setup produced the same tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from relaypipe.micro.models import ModelSize, build_model
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.http_backend import HTTPBackend
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.tasks.arith import ArithSpec, generate
from relaypipe.tasks.base import format_prompt

STUDENT = ModelSize(64, 2, 4, 128)  # presets/micro.yaml bootstrap.student
TEACHER = ModelSize(96, 3, 4, 256)  # bootstrap.teacher


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
            time.sleep(0.5)
    raise SystemExit(f"server at {url} did not come up in {seconds:.0f} s")


def serve(path: Path, name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "relaypipe.cli", "serve", "--model", str(path), "--name", name]
    cmd += ["--port", str(port), "--device", "cpu", "--api-key-env", ""]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def main(n: int, p: float, max_new: int) -> dict:
    torch.set_num_threads(1)  # the server processes get the rest
    tok = build_char_tokenizer()
    student = build_model(STUDENT, tok, seed=1).eval()
    teacher = build_model(TEACHER, tok, seed=2).eval()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("student", student), ("teacher", teacher)):
            model.save_pretrained(Path(tmp) / name)
            tok.save_pretrained(Path(tmp) / name)
        try:
            urls = {}
            for name in ("student", "teacher"):
                proc, urls[name] = serve(Path(tmp) / name, name)
                procs.append(proc)
            problems = generate(ArithSpec(difficulty=1, terms=3), n, 0, "eval")
            prompts = [
                tok(format_prompt(q.question, tok), add_special_tokens=False).input_ids
                for q in problems
            ]
            cfg = RelayConfig(mode="random_router", router_p=p, max_new_tokens=max_new, seed=0)
            for url in urls.values():
                wait_healthy(url)
            http_student = HTTPBackend(urls["student"], "student", tok, role="student")
            http_teacher = HTTPBackend(urls["teacher"], "teacher", tok)
            setups = {
                "in_process": RelayDecoder(
                    TransformersBackend(student), TransformersBackend(teacher), tok
                ),
                "teacher_http": RelayDecoder(TransformersBackend(student), http_teacher, tok),
                "both_http": RelayDecoder(http_student, http_teacher, tok),
            }
            res: dict = {"n": n, "router_p": p, "max_new_tokens": max_new, "threads": 1}
            tokens: dict[str, list] = {}
            for batch in (1, n):
                starts = range(0, n, batch)  # request ids as in one batch: the same draws
                for dec in setups.values():
                    dec.decode(prompts[:2], cfg)  # warm-up
                for _ in range(2):
                    for name, dec in setups.items():
                        t = time.perf_counter()
                        traces = [
                            tr for i in starts for tr in dec.decode(prompts[i : i + batch], cfg, i)
                        ]
                        key = f"batch{batch}_{name}_s"
                        res.setdefault(key, []).append(round(time.perf_counter() - t, 2))
                        tokens[name] = [tr.token_ids for tr in traces]
                        res[f"batch{batch}_student_rounds"] = sum(tr.turns for tr in traces)
                        res[f"batch{batch}_handoffs"] = sum(len(tr.handoffs) for tr in traces)
                        res[f"batch{batch}_teacher_tokens"] = sum(tr.n_teacher for tr in traces)
                res[f"batch{batch}_identical"] = all(
                    t == tokens["in_process"] for t in tokens.values()
                )
                # one batch or one prompt at a time: the same tokens (per-request RNGs)
                res.setdefault("batches_agree", []).append(tokens["in_process"])
            res["batches_agree"] = res["batches_agree"][0] == res["batches_agree"][-1]
            http_student.close()
            http_teacher.close()
            return res
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGINT)
                proc.wait(30)


if __name__ == "__main__":
    if len(sys.argv) > 4:
        raise SystemExit(__doc__)
    args = sys.argv[1:] + ["16", "0.2", "32"][len(sys.argv) - 1 :]
    print(json.dumps(main(int(args[0]), float(args[1]), int(args[2]))))
