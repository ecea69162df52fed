"""DVC's S3 remote and ``s3://`` data files, against moto's S3 server on 127.0.0.1.

The same code paths a real bucket (or MinIO / Ceph / R2 through ``endpointurl``) takes: dvc-s3 and
s3fs over HTTP, credentials from the environment only. The pipeline is cut down to its
``prepare`` stage (``dvc repro prepare``), whose benchmark table comes from an ``s3://`` JSONL.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml
from moto.server import ThreadedMotoServer

from relaypipe.tasks.dataset import DatasetSpec, load_problems
from tests.flow_helpers import flow_env, run
from tests.pipeline_helpers import SMALL_PARAMS, deep_update, make_repo

pytest_plugins = ["tests.prefect_fixtures"]

BUCKET = "relaypipe-test"
# moto accepts any key pair; real credentials come the same way (environment or an IAM role)
# and never go into .dvc/config.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BENCH_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 12 minus 5?", "answer": "7"},
    {"question": "A box holds 6 eggs. How many eggs are in 3 boxes?", "answer": "#### 18"},
]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 on a free loopback port with one bucket holding a benchmark JSONL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)
        body = "\n".join(json.dumps(row) for row in BENCH_ROWS) + "\n"
        s3.put_object(Bucket=BUCKET, Key="benchmarks/word.jsonl", Body=body.encode())
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def aws_env(s3_endpoint, monkeypatch, tmp_path) -> dict[str, str]:
    """Fake credentials in this process and its children; no user AWS config is read."""
    values = {
        **CREDENTIALS,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def test_benchmark_file_from_an_s3_url(aws_env, s3_endpoint, monkeypatch):
    # Endpoint from the environment (botocore's AWS_ENDPOINT_URL): what a stage reading an
    # s3:// source from an S3-compatible store needs; nothing in the spec is S3-specific.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    problems = load_problems(DatasetSpec(source=f"s3://{BUCKET}/benchmarks/word.jsonl"))
    assert [p.answer for p in problems] == ["7", "7", "18"]
    assert problems[0].problem_id == "word-000000" and problems[0].task == "word"


def digests(repo: Path) -> dict[str, str]:
    files = sorted(p for p in (repo / "data").rglob("*") if p.is_file())
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_dvc_push_then_pull_into_a_fresh_clone(prefect_api_url, aws_env, s3_endpoint, tmp_path):
    source = f"s3://{BUCKET}/benchmarks/word.jsonl"
    params = deep_update(
        json.loads(json.dumps(SMALL_PARAMS)),
        {"prepare": {"benchmarks": [{"name": "word", "source": source, "n": 3}]}},
    )
    repo = make_repo(tmp_path / "repo", params)
    env = flow_env(prefect_api_url)
    run("dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc", cwd=repo, env=env)
    run("dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint, cwd=repo, env=env)
    config = (repo / ".dvc" / "config").read_text()
    assert "endpointurl" in config
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in config and "secret" not in config
    run("git", "commit", "-qam", "S3 remote", cwd=repo, env=env)

    # The stage reads its benchmark from S3 (endpoint from the environment); dvc push/pull
    # below get theirs from .dvc/config only.
    run("dvc", "repro", "prepare", cwd=repo, env={**env, "AWS_ENDPOINT_URL": s3_endpoint})
    bench = pd.read_parquet(repo / "data/problems/benchmarks/word.parquet")
    assert list(bench.answer) == ["7", "7", "18"]
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-qm", "prepare", cwd=repo, env=env)
    # --with-deps: prepare's config comes from stage configure, which must travel too
    pushed = run("dvc", "push", "--with-deps", "prepare", cwd=repo, env=env)
    assert "pushed" in pushed.stdout

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/")["Contents"]]
    assert len(keys) >= 4  # train, eval, the benchmark table, the directory listing

    clone = tmp_path / "clone"
    run("git", "clone", "-q", repo, clone, cwd=tmp_path, env=env)
    assert not (clone / "data/problems/train.parquet").exists()
    # Only configure and prepare ran, so pull their outputs (the other stages have nothing in
    # the remote).
    run("dvc", "pull", "--with-deps", "prepare", cwd=clone, env=env)
    assert digests(clone) == digests(repo)
    status = run("dvc", "status", "prepare", cwd=clone, env=env).stdout
    assert "up to date" in status

    # Nothing needs re-running in the clone: DVC restored the outputs the lock file names.
    again = run("dvc", "repro", "prepare", cwd=clone, env=env)
    assert "Running stage" not in again.stdout
    assert yaml.safe_load((clone / "dvc.lock").read_text()) == yaml.safe_load(
        (repo / "dvc.lock").read_text()
    )
