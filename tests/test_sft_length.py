"""SFT's max_length comes from the data: trl's default (1024 tokens, keep-start) would cut a long
warm-up row before its answer and EOS; the stage fits max_length to the longest row, and an
explicit max_length below it fails before any model is loaded, naming the key and the row."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from relaypipe.config import ConfigError
from relaypipe.models import load_model, trainer_precision
from relaypipe.stages import sft
from relaypipe.teacher import TeacherSpec
from relaypipe.train.trainer_args import example_lengths
from tests.tiny_stage_inputs import make_inputs

LONG = 1500  # characters = tokens with the character tokenizer: beyond trl's 1024


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sftlen")
    return root, make_inputs(root, max_positions=2048, long_completion=LONG)


def params(root, paths, **trainer) -> sft.SFTParams:
    return sft.SFTParams(
        trainer={
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "save_strategy": "no",
            **trainer,
        },
        device="cpu",
        data=paths["warmup"],
        student=paths["student"],
        teacher=TeacherSpec(paths["teacher"]),
        eval_problems=paths["eval"],
        checkpoint_dir=str(root / "ckpt"),
        out_model=str(root / "warm"),
        out_dir=str(root / "sft"),
    )


def dataset_rows(trainer) -> list[list[int]]:
    return list(trainer.train_dataset["input_ids"])


def test_training_sees_every_row_whole(inputs):
    root, paths = inputs
    p = params(root, paths)
    table, max_length = sft.prepare_sft(p, "cpu")
    model, tok = load_model(p.student, device="cpu")
    lengths = example_lengths(list(table.prompt), list(table.completion), tok)
    assert max_length == max(lengths) == lengths[0] > LONG > 1024  # the long row, with EOS

    precision = trainer_precision(model, p.trainer, "sft")
    args = sft.build_sft_config(p, "cpu", precision=precision, max_length=max_length)
    rows = dataset_rows(sft.make_sft_trainer(model, tok, table, args))
    assert [len(r) for r in rows] == lengths
    assert all(r[-1] == tok.eos_token_id for r in rows)  # every row ends in its EOS
    assert tok.decode(rows[0]).endswith(table.completion[0].split("\n")[-1] + tok.eos_token)

    # what the stage prevents: trl's own default keeps the first 1024 tokens of the long row
    cut = dataset_rows(sft.make_sft_trainer(model, tok, table, sft.build_sft_config(p, "cpu")))
    assert len(cut[0]) == 1024 and cut[0][-1] != tok.eos_token_id


def test_an_explicit_max_length_too_small_fails_before_training(inputs):
    root, paths = inputs
    p = replace(
        params(root, paths, max_length=64),
        checkpoint_dir=str(root / "ckpt-small"),
        out_model=str(root / "warm-small"),
    )
    with pytest.raises(ConfigError) as err:
        sft.train_sft(p)
    message = str(err.value)
    longest = max(
        example_lengths(
            list(pd.read_parquet(paths["warmup"]).prompt),
            list(pd.read_parquet(paths["warmup"]).completion),
            load_model(paths["student"], device="cpu")[1],
        )
    )
    assert "sft.trainer.max_length is 64" in message and f"row 0 of {paths['warmup']}" in message
    assert f"is {longest} tokens" in message and f"at least {longest}" in message
    assert not Path(p.out_model).exists() and not Path(p.checkpoint_dir).exists()  # no start
    # large enough, or null (trl then never truncates): accepted as given
    assert sft.prepare_sft(params(root, paths, max_length=4096), "cpu")[1] == 4096
    assert sft.prepare_sft(params(root, paths, max_length=None), "cpu")[1] is None


def test_the_stage_trains_on_the_long_rows(inputs):
    root, paths = inputs
    assert sft.train_sft(params(root, paths, learning_rate=1e-2)) == []  # weights moved
    assert (root / "warm" / "model.safetensors").is_file()
