"""The paper-scale path (presets/paper-gpu.yaml) on tiny random Qwen3 and Llama models, on CPU.

Issue 13's items, each shown on real models built here:
1. one ``dtype`` per stage, honoured when loading: a bfloat16 student stays bfloat16 through
   filter, warmup_data, sft, grpo and evaluate (and float32 when asked), and trl's precision
   flags follow the weights;
2. the backend's KV memory grows with what is decoded and is given back after a decode, with
   byte-identical tokens whatever the growth step (the up-front allocation included);
3. the post-training checks decode in ``eval_batch_size`` batches;
4. the call tags' embedding rows are the mean of the real vocabulary's rows, also when the
   matrix already had spare rows for them (Qwen3: 151,936 rows for ~151,669 tokens).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from flows.stages import params_class
from relaypipe.bounds import RelayBounds
from relaypipe.config import ConfigError, build
from relaypipe.importing import import_model
from relaypipe.io import write_json, write_table
from relaypipe.models import load_model, trainer_precision
from relaypipe.relay.backends import GenRequest
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.trace import Source
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.schemas import FilteredProblemSchema, SFTExampleSchema
from relaypipe.stages import evaluate, filter, grpo, prepare, sft, warmup_data
from relaypipe.teacher import TeacherSpec, build_teacher
from relaypipe.train.warmup import InsertSpec

ROOT = Path(__file__).resolve().parents[1]
LOADING_STAGES = ("filter", "warmup_data", "sft", "grpo", "evaluate")
PROMPTS = ["Q: 1+2\nA: ", "Q: 33+4+5+6\nA: ", "Q: 5\nA: ", "Q: 12+1\nA: 7"]


def qwen3(vocab: int, tokenizer, seed: int, *, tie: bool = False, hidden: int = 32):
    """A tiny Qwen3 (q/k norms, grouped kv heads): the paper's family, random weights."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Qwen3ForCausalLM(cfg).eval()


def llama(vocab: int, tokenizer, seed: int, *, tie: bool = True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def save(model, tokenizer, folder: Path, dtype: torch.dtype) -> Path:
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def loaded_dtypes(caplog) -> list[str]:
    """The dtype of every model relaypipe.models.load_model loaded, from its log lines."""
    return [
        m.group(1)
        for r in caplog.records
        if r.name == "relaypipe.models" and (m := re.search(r"\(dtype torch\.(\w+)\)", r.message))
    ]


# ------------------------------------------------------------------------ 1. dtype per stage


@pytest.fixture(scope="module")
def qwen_work(tmp_path_factory, tokenizer):
    """Problems from the prepare stage and a Qwen3 student/teacher pair saved in bfloat16."""
    root = tmp_path_factory.mktemp("paper_scale")
    bench = prepare.BenchmarkSpec(name="arith-d1t3", n=2, terms=3)
    prepare.run(
        prepare.PrepareParams(
            terms=3, n_train=8, n_eval=3, benchmarks=[bench], out_dir=str(root / "problems")
        )
    )
    save(qwen3(len(tokenizer), tokenizer, 1), tokenizer, root / "student", torch.bfloat16)
    save(
        qwen3(len(tokenizer), tokenizer, 2, hidden=48), tokenizer, root / "teacher", torch.bfloat16
    )
    return root


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)],
)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_models_load_in_the_saved_dtype_unless_told(tmp_path, tokenizer, family, dtype, expected):
    build_fn = qwen3 if family == "qwen3" else llama
    folder = save(build_fn(len(tokenizer), tokenizer, 3), tokenizer, tmp_path / "m", torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model, tok = load_model(str(folder), device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    with build_teacher(str(folder), tok, device="cpu", dtype=dtype) as teacher:
        assert {p.dtype for p in teacher.model.parameters()} == {expected}
        backend = teacher.backend
        backend.generate([GenRequest("a", ids(tok, PROMPTS[0]), 3)])
        # the KV store follows the weights: 2 layers x 2 kv heads x head_dim x 2 x dtype size
        head_dim = model.config.head_dim
        assert backend.kv_bytes_per_token == 2 * 2 * head_dim * 2 * expected.itemsize
        assert backend._store is not None and backend._store.data.dtype == expected


@pytest.mark.parametrize("stage", LOADING_STAGES)
def test_a_bad_dtype_is_refused_naming_the_key(stage):
    base = {"insert": {}} if stage == "warmup_data" else {}
    with pytest.raises(ConfigError, match=rf"params\.yaml:{stage}: dtype must be one of auto, "):
        build(params_class(stage), {**base, "dtype": "bf16"}, f"params.yaml:{stage}")
    assert build(params_class(stage), base, stage).dtype == "auto"


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_eval_batch_size_is_a_param(stage):
    assert build(params_class(stage), {}, stage).eval_batch_size == 100
    with pytest.raises(ConfigError, match=rf"{stage}: eval_batch_size must be >= 1"):
        build(params_class(stage), {"eval_batch_size": 0}, stage)


@pytest.mark.parametrize(
    ("dtype", "trainer", "expected"),
    [
        (torch.float32, {}, {"bf16": False, "fp16": False}),
        (torch.bfloat16, {}, {"bf16": True, "fp16": False}),  # on the CPU too: it was asked for
        (torch.float16, {}, {"bf16": False, "fp16": False}),
        (torch.float32, {"bf16": True}, {"bf16": False}),  # mixed precision: allowed, explicit
        (torch.bfloat16, {"bf16": True}, {"bf16": True}),
        (torch.bfloat16, {"bf16": False}, "sft.trainer.bf16: false contradicts"),
        (torch.float16, {"bf16": True}, "sft.trainer.bf16: true contradicts"),
        (torch.bfloat16, {"fp16": True}, "sft.trainer.fp16: true contradicts"),
        (torch.float16, {"fp16": True}, "sft.trainer.fp16: true contradicts"),
    ],
)
def test_trl_precision_flags_follow_the_weights(tokenizer, dtype, trainer, expected):
    model = qwen3(len(tokenizer), tokenizer, 4).to(dtype)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=re.escape(expected)) as err:
            trainer_precision(model, trainer, "sft")
        assert "sft.dtype" in str(err.value)
        return
    flags = trainer_precision(model, trainer, "sft")
    assert flags["use_cpu"] is True
    assert {k: flags[k] for k in expected} == expected


def stage_kwargs(work: Path, tmp: Path) -> dict[str, dict]:
    """Each stage's params on the tiny bfloat16 pair: a few problems, a few tokens."""
    problems = work / "problems"
    common = {"device": "cpu", "threads": 2, "max_new_tokens": 8}
    return {
        "filter": {
            **common,
            "k": 1,
            "n_problems": 4,
            "batch_size": 4,
            "problems": str(problems / "train.parquet"),
            "teacher": TeacherSpec(str(work / "teacher")),
            "out_dir": str(tmp / "filter"),
            "allow_degenerate": True,  # a random tiny teacher solves nothing
        },
        "warmup_data": {
            **common,
            "insert": InsertSpec(),
            "n_problems": 4,
            "offset": 0,
            "samples_per_problem": 1,
            "batch_size": 4,
            "min_examples": 4,
            "top_up_with_reference": True,  # a random student solves nothing
            "allow_degenerate": True,
            "problems": str(problems / "train.parquet"),
            "student": str(work / "student"),
            "out_dir": str(tmp / "warmup"),
        },
        "evaluate": {
            **common,
            "modes": ["student", "warmup", "relay", "teacher"],
            "limit": 2,
            "batch_size": 2,
            "benchmarks_dir": str(problems / "benchmarks"),
            "student": str(work / "student"),
            "warmup": str(work / "student"),
            "relay_model": str(work / "student"),  # no relay.json: bounds and prompt given
            "bounds": RelayBounds(),
            "chat_template": False,
            "teacher": TeacherSpec(str(work / "teacher")),
            "out_dir": str(tmp / "eval"),
        },
    }


def run_stage(module, kwargs: dict, caplog, **overrides) -> list[str]:
    """Run one stage in-process; the dtypes of the models it loaded."""
    caplog.clear()
    cls = params_class(module.__name__.rsplit(".", 1)[1])
    module.run(cls(**{**kwargs, **overrides}))
    return loaded_dtypes(caplog)


def test_decoding_stages_cast_to_the_dtype_they_are_given(qwen_work, tmp_path, caplog):
    """filter, warmup_data and evaluate on a bfloat16 pair: bfloat16 by default (auto), float32
    when asked; every model each stage loads (teacher, students) is counted."""
    caplog.set_level(logging.INFO, logger="relaypipe.models")
    kw = stage_kwargs(qwen_work, tmp_path)
    for module, n_models in ((filter, 1), (warmup_data, 1), (evaluate, 4)):
        name = module.__name__.rsplit(".", 1)[1]
        assert run_stage(module, kw[name], caplog) == ["bfloat16"] * n_models, name
        got = run_stage(module, kw[name], caplog, dtype="float32")
        assert got == ["float32"] * n_models, name


@pytest.mark.slow
def test_sft_and_grpo_keep_a_bfloat16_student_bfloat16(qwen_work, tmp_path, caplog):
    """Training stages: the student loads as bfloat16, trl trains it in bfloat16 on the CPU
    (its flags follow the weights), the saved model is bfloat16, and the checks load it
    back as bfloat16 and decode in ``eval_batch_size`` batches. Then GRPO in mixed precision
    (float32 weights, bf16 autocast), as presets/paper-gpu.yaml trains."""
    caplog.set_level(logging.DEBUG, logger="relaypipe")
    problems = qwen_work / "problems"
    table = pd.DataFrame(
        {
            "problem_id": ["a", "b"],
            "prompt": ["Q: 1+2\nA: ", "Q: 3+4\nA: "],
            "completion": ["1+2=3\nAnswer: 3", "3+<call>2</call>4=7\nAnswer: 7"],
            "n_commands": [0, 1],
            "policy": ["random", "random"],
        }
    )
    write_table(table, tmp_path / "sft.parquet", SFTExampleSchema)
    common = {
        "device": "cpu",
        "threads": 2,
        "max_new_tokens": 8,
        "eval_n": 3,
        "eval_batch_size": 2,
        "allow_degenerate": True,
        "teacher": TeacherSpec(str(qwen_work / "teacher")),
        "eval_problems": str(problems / "eval.parquet"),
    }
    sft_params = sft.SFTParams(
        trainer={"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2},
        data=str(tmp_path / "sft.parquet"),
        student=str(qwen_work / "student"),
        checkpoint_dir=str(tmp_path / "ckpt_sft"),
        out_model=str(tmp_path / "warmup"),
        out_dir=str(tmp_path / "sft"),
        **common,
    )
    caplog.clear()
    sft.run(sft_params)
    # train: the student; check: the student, the warmed-up one and the teacher
    assert loaded_dtypes(caplog) == ["bfloat16"] * 4
    assert json.loads((tmp_path / "warmup" / "config.json").read_text())["dtype"] == "bfloat16"
    # the check's student backends (named "model") decoded 3 problems as batches of 2 + 1
    sizes = check_batch_sizes(caplog, "model")
    assert max(sizes) == 2 and 1 in sizes

    train = pd.read_parquet(problems / "train.parquet")[:4].assign(teacher_pass_rate=1.0)
    write_table(train, tmp_path / "kept.parquet", FilteredProblemSchema)
    write_json(tmp_path / "bootstrap.json", {"student_accuracy": 0.0, "teacher_accuracy": 0.5})
    grpo_params = grpo.GRPOParams(
        trainer={
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "num_generations": 2,
            "learning_rate": 1e-2,
            "temperature": 1.0,
            "beta": 0.0,
        },
        problems=str(tmp_path / "kept.parquet"),
        student=str(tmp_path / "warmup"),
        bootstrap_metrics=str(tmp_path / "bootstrap.json"),
        checkpoint_dir=str(tmp_path / "ckpt_grpo"),
        out_model=str(tmp_path / "relay"),
        out_dir=str(tmp_path / "grpo"),
        **common,
    )
    caplog.clear()
    grpo.run(grpo_params)
    # train: the student and the teacher; check: the trained student and the teacher
    assert loaded_dtypes(caplog) == ["bfloat16"] * 4
    assert json.loads((tmp_path / "relay" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "policy: KV cache" in caplog.text  # the rollouts decoded with the bf16 policy
    sizes = check_batch_sizes(caplog, "model")
    assert max(sizes) == 2 and 1 in sizes

    # the paper preset's training setup: float32 weights, trl's bf16 autocast (accelerate wraps
    # the policy's forward in it, and the rollouts decode through that forward)
    caplog.clear()
    amp = replace(
        grpo_params,
        dtype="float32",
        trainer={**grpo_params.trainer, "bf16": True},
        checkpoint_dir=str(tmp_path / "ckpt_amp"),
        out_model=str(tmp_path / "relay_amp"),
        out_dir=str(tmp_path / "grpo_amp"),
    )
    grpo.run(amp)
    assert loaded_dtypes(caplog) == ["float32"] * 4
    assert "grpo: mixed precision (float32 weights, bf16 autocast)" in caplog.text
    assert json.loads((tmp_path / "relay_amp" / "config.json").read_text())["dtype"] == "float32"


def check_batch_sizes(caplog, backend_name: str) -> list[int]:
    """Requests per decode of one backend, from its memory-estimate log lines."""
    pattern = re.compile(rf"^{backend_name}: KV cache up to [\d.]+ MiB for (\d+) requests")
    return [int(m.group(1)) for r in caplog.records if (m := pattern.match(r.getMessage()))]


def test_the_paper_preset_sets_dtypes_trl_agrees_with(tokenizer):
    config = yaml.safe_load((ROOT / "presets" / "paper-gpu.yaml").read_text())
    for stage in LOADING_STAGES:
        params = build(params_class(stage), config[stage], f"paper-gpu.yaml:{stage}")
        assert params.dtype in ("bfloat16", "float32"), stage  # never left to "auto"
        if stage in ("sft", "grpo"):
            assert params.eval_batch_size < 100  # 4096-token checks: smaller batches
            model = qwen3(len(tokenizer), tokenizer, 5).to(getattr(torch, params.dtype))
            flags = trainer_precision(model, params.trainer, stage)  # raises on a contradiction
            assert {**flags, **params.trainer}["bf16"] is True  # bfloat16 compute on the GPU
    micro = yaml.safe_load((ROOT / "presets" / "micro.yaml").read_text())
    for stage in LOADING_STAGES:
        assert build(params_class(stage), micro[stage], stage).dtype == "auto"


# ------------------------------------------------------------------------ 2. KV memory


@pytest.fixture(params=["llama-lean", "llama-hf", "qwen3-bf16"])
def kv_model(request, tokenizer):
    if request.param == "qwen3-bf16":
        return qwen3(len(tokenizer), tokenizer, 6).to(torch.bfloat16), None
    return llama(len(tokenizer), tokenizer, 7), request.param == "llama-lean"


def test_kv_memory_grows_with_what_is_decoded_and_is_released(kv_model, tokenizer):
    model, fast = kv_model
    contexts = [ids(tokenizer, p) for p in PROMPTS]

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(len(contexts))]

    sampling = Sampling(temperature=1.0)
    probe = TransformersBackend(model, fast=fast)
    free_run = probe.generate(
        [GenRequest(i, c, 30, g) for i, (c, g) in enumerate(zip(contexts, gens(), strict=True))],
        sampling=sampling,
    )
    stops = frozenset(r.tokens[5] for r in free_run)  # each request stops within 6 tokens

    def decode(backend):
        reqs = [
            GenRequest(i, c, 4000, g) for i, (c, g) in enumerate(zip(contexts, gens(), strict=True))
        ]
        return backend.generate(reqs, stop_token_ids=stops, sampling=sampling)

    grown = TransformersBackend(model, fast=fast, kv_chunk=16)
    up_front = TransformersBackend(model, fast=fast, kv_chunk=10**6)  # the old allocation
    short, reference = decode(grown), decode(up_front)
    assert [r.tokens for r in short] == [r.tokens for r in reference]
    assert all(r.finish == "stop" and len(r.tokens) <= 6 for r in short)

    per_token, b = grown.kv_bytes_per_token, len(contexts)
    written = max(map(len, contexts)) + 6
    # about what was written (one chunk of slack, at most one doubling) ...
    assert grown.kv_peak_bytes <= per_token * b * 2 * (written + 16)
    assert grown.kv_bytes == grown.kv_peak_bytes  # held for the next call of these requests
    # ... where the up-front store held batch x (prompt + max_new_tokens)
    assert up_front.kv_peak_bytes >= per_token * b * 4000
    assert grown.kv_peak_bytes * 50 < up_front.kv_peak_bytes

    for i in range(b):
        assert grown.kv_bytes > 0
        grown.release(i)
    assert grown.kv_bytes == 0  # nothing cached: the store is given back
    again = decode(grown)  # and a fresh one serves the next decode
    assert [r.tokens for r in again] == [r.tokens for r in reference]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_relay_decodes_are_identical_however_the_cache_grows(kv_model, tokenizer, temperature):
    """The same traces with columns added as reached (kv_chunk=1) or all up front, and
    after every decode both backends hold no KV memory (evaluation's backends take turns).
    The random router hands over often: the teacher's cache grows across many short calls."""
    model, fast = kv_model
    if fast is None:
        teacher = qwen3(len(tokenizer), tokenizer, 8, hidden=48).to(model.dtype)
    else:
        teacher = llama(len(tokenizer), tokenizer, 8)
    sampling = Sampling(temperature=temperature)
    cfg = RelayConfig(
        mode="random_router",
        router_p=0.3,
        max_new_tokens=32,
        seed=3,
        student_sampling=sampling,
        teacher_sampling=sampling,
    )
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    traces, peaks = {}, {}
    for chunk in (1, 10**6):
        s = TransformersBackend(model, fast=fast, kv_chunk=chunk)
        t = TransformersBackend(teacher, fast=fast, kv_chunk=chunk)
        # a fixed hold: "auto" times the steps, and the schedule (so the store's growth, not the
        # tokens) would follow the machine's load
        decoder = RelayDecoder(s, t, tokenizer, cfg, teacher_hold=0)
        traces[chunk] = [(tr.token_ids, tr.sources) for tr in decoder.decode(prompts)]
        assert any(Source.TEACHER in sources for _, sources in traces[chunk])
        assert s.kv_bytes == t.kv_bytes == 0
        # the store holds what the longest request reached (at most twice, by doubling)
        longest = max(
            len(p) + len(tokens) for p, (tokens, _) in zip(prompts, traces[chunk], strict=True)
        )
        assert s.kv_peak_bytes <= s.kv_bytes_per_token * len(prompts) * 2 * longest
        peaks[chunk] = s.kv_peak_bytes
    assert traces[1] == traces[10**6]
    # each call's columns are capped by what its requests can reach: never more up front
    assert peaks[1] <= peaks[10**6]


def test_a_memory_estimate_is_logged_before_a_decode(tokenizer, caplog):
    caplog.set_level(logging.DEBUG, logger="relaypipe.relay.transformers_backend")
    model = qwen3(len(tokenizer), tokenizer, 9).to(torch.bfloat16)
    backend = TransformersBackend(model, name="student")
    # 2 layers x 2 kv heads x head_dim 8 x (keys, values) x 2 bytes
    assert backend.kv_bytes_per_token == 2 * 2 * 8 * 2 * 2 == 128
    a, b = ids(tokenizer, PROMPTS[0]), ids(tokenizer, PROMPTS[1])
    backend.generate([GenRequest("a", a, 10), GenRequest("b", b, 20)])
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    tokens = len(a) + 10 + len(b) + 20
    assert f"for 2 requests ({tokens} tokens x 128 B/token = 2 layers x 2 kv heads" in (
        record.getMessage()
    )
    backend.generate([GenRequest("a", [*a, 5], 10)])  # the same decode goes on: no new estimate
    assert len(caplog.records) == 1
    backend.release("a")
    backend.release("b")
    backend.generate([GenRequest("c", a, 10)])  # a new decode: estimated again, a smaller one
    assert len(caplog.records) == 2 and caplog.records[1].levelno == logging.DEBUG


# ------------------------------------------------------------------------ 4. call-token rows


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer without the call tags (as a pretrained model's would be)."""
    eot = "<|endoftext|>"
    vocab = {eot: 0, **{ch: i + 1 for i, ch in enumerate("0123456789+=\nQA: ")}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eot))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eot, unk_token=eot, pad_token=eot, bos_token=eot
    )


@pytest.mark.parametrize(
    ("family", "tie", "dtype"),
    [
        ("qwen3", False, torch.float32),
        ("qwen3", False, torch.bfloat16),
        ("qwen3", True, torch.float32),
        ("llama", True, torch.float32),
        ("llama", False, torch.bfloat16),
    ],
)
def test_call_tags_on_spare_rows_get_the_mean_of_the_real_vocabulary(tmp_path, family, tie, dtype):
    tok = plain_tokenizer()
    real, spare = len(tok), 8  # the matrix is larger than the tokenizer, as in Qwen3
    build_fn = qwen3 if family == "qwen3" else llama
    raw = build_fn(real + spare, tok, 11, tie=tie).to(dtype)
    inp0 = raw.get_input_embeddings().weight.detach().clone()  # as saved, before the tags
    out0 = raw.get_output_embeddings().weight.detach().clone()
    source = save(raw, tok, tmp_path / "src", dtype)

    model, loaded_tok = load_model(str(source), device="cpu")
    call_ids = loaded_tok.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
    assert call_ids == [real, real + 1]  # padding rows of the existing matrix ...
    assert model.get_input_embeddings().num_embeddings == real + spare  # ... no growth
    inp = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings().weight.detach()
    assert inp.dtype == dtype
    mean_in = inp0[:real].float().mean(dim=0).to(dtype)
    mean_out = out0[:real].float().mean(dim=0).to(dtype)
    for i in call_ids:
        assert torch.equal(inp[i], mean_in)
        assert torch.equal(out[i], mean_out)
        assert not torch.equal(inp0[i], mean_in)  # the random padding row it replaced
    untouched = [i for i in range(real + spare) if i not in call_ids]
    assert torch.equal(inp[untouched], inp0[untouched])  # real rows and other spare rows
    assert torch.equal(out[untouched], out0[untouched])
    if tie:
        assert out.data_ptr() == inp.data_ptr()

    # relaypipe import writes those rows, and a reload keeps what is saved (trained rows of a
    # relaypipe model are never re-initialised: its tokenizer already knows the tags)
    result = import_model(str(source), tmp_path / "imported", dtype="auto")
    assert result.dtype == str(dtype).removeprefix("torch.")
    again, _ = load_model(str(tmp_path / "imported"), device="cpu")
    assert torch.equal(again.get_input_embeddings().weight, inp)
    with torch.no_grad():
        again.get_input_embeddings().weight[real] = 0.5
    save(again, loaded_tok, tmp_path / "trained", dtype)
    reloaded, _ = load_model(str(tmp_path / "trained"), device="cpu")
    assert (reloaded.get_input_embeddings().weight[real] == 0.5).all()


def test_a_callers_autocast_does_not_change_the_tokens(tokenizer):
    """trl trains float32 weights under bf16 autocast and calls the rollout from there: the
    backend decodes in the weights' dtype all the same (lean and Hugging Face forwards)."""
    model = llama(len(tokenizer), tokenizer, 12)
    contexts = [ids(tokenizer, p) for p in PROMPTS]
    for fast in (True, False):
        plain = TransformersBackend(model, fast=fast)
        expected = plain.generate([GenRequest(i, c, 12) for i, c in enumerate(contexts)])
        backend = TransformersBackend(model, fast=fast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = backend.generate([GenRequest(i, c, 12) for i, c in enumerate(contexts)])
        assert [r.tokens for r in got] == [r.tokens for r in expected]
        assert backend._store is not None and backend._store.data.dtype == torch.float32
