"""Warm-up insertion, the relay rollout for GRPO, and short real SFT / GRPO trainer runs."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import parse_call, strip_calls
from relaypipe.relay.trace import Source
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.train.rewards import difficulty_aware_reward
from relaypipe.train.rollout import make_relay_rollout, rollout_fields
from relaypipe.train.warmup import (
    InsertSpec,
    build_warmup_example,
    insert_commands,
    uncertain_spans,
)
from tests.test_decoder import ScriptedBackend

SOLUTION = "7+5=12\n12+9=21\nAnswer: 21"


def test_insert_commands_at_exact_positions(tokenizer):
    ids = tokenizer("abcd", add_special_tokens=False).input_ids
    out = insert_commands(ids, [1, 3], [4, 2], tokenizer)
    assert tokenizer.decode(out) == "a<call>4</call>bc<call>2</call>d"


def test_warmup_examples_counts_positions_n_and_untouched_text(tokenizer):
    spec = InsertSpec(max_commands=3, n_values=(2, 5))
    rng = random.Random(0)
    counts = set()
    for _ in range(60):
        prompt, completion, ns = build_warmup_example("7+5+9", SOLUTION, tokenizer, spec, rng)
        assert prompt == "Q: 7+5+9\nA: "
        assert strip_calls(completion) == SOLUTION  # the student's text is unchanged
        assert completion.count("<call>") == len(ns) <= 3 and set(ns) <= {2, 5}
        assert not completion.startswith("<call>") and not completion.endswith("</call>")
        pieces = completion.split("<call>")[1:]
        assert [parse_call("<call>" + p.split("</call>")[0] + "</call>") for p in pieces] == ns
        counts.add(len(ns))
    assert counts == {0, 1, 2, 3}  # uniform count: every value shows up


def test_disagreement_policy_places_commands_where_models_differ(tokenizer, tiny_models):
    student, teacher = tiny_models
    spec = InsertSpec(policy="disagreement", max_commands=3, n_values=(4,))
    rng = random.Random(1)
    _, completion, ns = build_warmup_example(
        "7+5+9", SOLUTION, tokenizer, spec, rng, student, teacher
    )
    assert strip_calls(completion) == SOLUTION and all(n == 4 for n in ns)
    with pytest.raises(ValueError, match="needs the student and the teacher"):
        build_warmup_example("1", SOLUTION, tokenizer, spec, random.Random(3))


def _teacher_forced_probs(model, tokenizer, prompt, completion):
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    c_ids = tokenizer(completion, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0]
    probs = logits.softmax(-1)
    return [probs[len(p_ids) + i - 1, t].item() for i, t in enumerate(c_ids)]


def test_uncertainty_policy_calls_before_each_unsure_run_asking_for_its_length(
    tokenizer, tiny_models
):
    student, _ = tiny_models
    probs = _teacher_forced_probs(student, tokenizer, "Q: 7+5+9\nA: ", SOLUTION)
    threshold = sorted(probs[1:])[len(probs) // 2]  # about half the tokens are "unsure"
    unsure = [i for i in range(1, len(probs)) if probs[i] < threshold]
    starts = [i for i in unsure if i - 1 not in unsure]
    length = {s: next(j for j in range(s, len(probs) + 1) if j not in unsure) - s for s in starts}
    p_ids = tokenizer("Q: 7+5+9\nA: ", add_special_tokens=False).input_ids
    c_ids = tokenizer(SOLUTION, add_special_tokens=False).input_ids
    spans = uncertain_spans(p_ids, c_ids, student, threshold, 100, (1, 2, 4))
    assert [q for q, _ in spans] == starts
    assert [n for _, n in spans] == [
        min(n for n in (1, 2, 4) if n >= length[s]) if length[s] <= 4 else 4 for s in starts
    ]
    # capped: the least confident runs are kept, in text order
    capped = uncertain_spans(p_ids, c_ids, student, threshold, 2, (1, 2, 4))
    lowest = sorted(starts, key=lambda s: min(probs[s : s + length[s]]))[:2]
    assert [q for q, _ in capped] == sorted(lowest)

    spec = InsertSpec(policy="uncertainty", max_commands=3, n_values=(1, 2, 4), threshold=threshold)
    _, completion, ns = build_warmup_example(
        "7+5+9", SOLUTION, tokenizer, spec, random.Random(0), student
    )
    assert strip_calls(completion) == SOLUTION and len(ns) == min(3, len(starts))
    # a student sure of every token gets no command at all (the count is not drawn at random)
    sure = InsertSpec(policy="uncertainty", threshold=min(probs[1:]) / 2)
    assert (
        build_warmup_example("7+5+9", SOLUTION, tokenizer, sure, random.Random(0), student)[2] == []
    )
    with pytest.raises(ValueError, match="needs the student model"):
        build_warmup_example("1", SOLUTION, tokenizer, spec, random.Random(3))
    with pytest.raises(ValueError, match="threshold"):
        InsertSpec(policy="uncertainty", threshold=0.0)


def test_rollout_fields_env_mask_covers_exactly_teacher_tokens(tokenizer):
    student = ScriptedBackend(tokenizer, {0: ["12+<call>3</call>", "9=21<eos>"], 1: ["7<eos>"]})
    teacher = ScriptedBackend(tokenizer, {0: ["abc"]})
    traces = RelayDecoder(student, teacher, tokenizer).decode_text(["Q: 1\nA: ", "Q: 2\nA: "])
    fields = rollout_fields(traces, tokenizer, mask_teacher_tokens=True)
    assert len(fields["completion_ids"]) == 2
    for ids, mask, tr in zip(fields["completion_ids"], fields["env_mask"], traces, strict=True):
        assert len(ids) == len(mask)
        assert [i for i, m in enumerate(mask) if m == 0] == [
            i for i, s in enumerate(tr.sources) if s == Source.TEACHER
        ]
    assert fields["teacher_tokens"] == [3, 0] and fields["calls"] == [1, 0]
    assert fields["finished"] == [True, True]  # both ended at the student's EOS
    long = ScriptedBackend(tokenizer, {0: ["12+9=21<eos>"]})
    cut = RelayDecoder(long, teacher, tokenizer, RelayConfig(max_new_tokens=4)).decode_text(
        ["Q: 1\nA: "]
    )
    assert rollout_fields(cut, tokenizer, mask_teacher_tokens=True)["finished"] == [False]
    unmasked = rollout_fields(traces, tokenizer, mask_teacher_tokens=False)
    assert all(set(m) == {1} for m in unmasked["env_mask"])


def _fake_trainer(model, **args):
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_completion_length": 16}
    return SimpleNamespace(
        model=model,
        args=SimpleNamespace(**{**defaults, **args}),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def test_rollout_func_one_completion_per_prompt(tokenizer, tiny_models):
    student, teacher = tiny_models
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=16, seed=0)
    rollout = make_relay_rollout(TransformersBackend(teacher), tokenizer, cfg)
    prompts = ["Q: 1+2\nA: "] * 3 + ["Q: 4+4\nA: "] * 3  # trl repeats each prompt G times
    trainer = _fake_trainer(student)
    student.train()  # as under trl: rollouts happen while the policy is in training mode
    out = rollout(prompts, trainer)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["env_mask"]) == 6
    assert out["prompt_ids"][0] == tokenizer("Q: 1+2\nA: ", add_special_tokens=False).input_ids
    assert all(0 < len(c) <= 16 for c in out["completion_ids"])
    assert sum(out["teacher_tokens"]) == sum(m.count(0) for m in out["env_mask"]) > 0
    assert out["logprobs"] is None
    assert trainer._metrics["train"]["relay/teacher_share"]
    assert student.training  # put back in the mode it was in
    student.eval()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_sft_trainer_runs_logs_a_loss_and_changes_every_parameter(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from relaypipe.micro.models import ModelSize, build_model

    model = build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=5)
    before = _params(model)
    data = Dataset.from_dict(
        {"prompt": ["Q: 7+5+9\nA: "] * 8, "completion": ["7+5<call>4</call>=12\nAnswer: 21"] * 8}
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert any("loss" in h for h in trainer.state.log_history)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)


@pytest.mark.slow
def test_grpo_trainer_with_relay_rollouts(tokenizer, tiny_models, tmp_path):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import GRPOConfig, GRPOTrainer

    from relaypipe.micro.models import ModelSize, build_model

    _, teacher = tiny_models
    model = build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=6)
    before = _params(model)
    # random_router forces hand-offs, so rewards (call ratio for wrong answers) vary in a group
    cfg = RelayConfig(mode="random_router", router_p=0.3, max_new_tokens=12, seed=0)
    rollout = make_relay_rollout(TransformersBackend(teacher), tokenizer, cfg)
    data = Dataset.from_dict(
        {
            "prompt": ["Q: 1+2\nA: ", "Q: 3+4\nA: "] * 2,
            "answer": ["3", "7"] * 2,
            "problem_id": ["a", "b"] * 2,
        }
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        learning_rate=1e-2,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        temperature=1.0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[difficulty_aware_reward],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        rollout_func=rollout,
    )
    trainer.train()
    logs = trainer.state.log_history
    assert any("loss" in h for h in logs)
    assert any("relay/teacher_share" in h and h["relay/teacher_share"] > 0 for h in logs)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "GRPO changed no parameter"


class _Knows:
    """A scripted student: teacher-forced, its greedy choice is the next token of ``text``
    except at the completion positions in ``gaps``, where it picks another token."""

    def __init__(self, vocab: int, prompt_len: int, gaps: set[int]):
        self.vocab, self.prompt_len, self.gaps = vocab, prompt_len, gaps

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        for j in range(len(ids) - 1):  # position j predicts token j + 1
            i = j + 1 - self.prompt_len  # completion index of that token
            logits[0, j, (ids[j + 1] + (i in self.gaps)) % self.vocab] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ({3}, [(3, 1)]),  # one unknown token: one call for 1
        ({0, 7, 8}, [(0, 1), (7, 2)]),  # the very first token, then a run of two
        ({2, 3, 4}, [(2, 2), (4, 1)]),  # a run longer than the largest n: split
        (set(), []),  # a student that writes the reference itself never calls
    ],
)
def test_mistakes_policy_calls_before_every_token_the_student_would_get_wrong(
    tokenizer, gaps, expected
):
    from relaypipe.train.warmup import greedy_choices, mistake_spans

    p_ids = tokenizer("Q: 7+5+9\nA: ", add_special_tokens=False).input_ids
    c_ids = tokenizer(SOLUTION, add_special_tokens=False).input_ids
    student = _Knows(len(tokenizer), len(p_ids), gaps)
    greedy = greedy_choices(student, [p_ids], [c_ids])[0]
    assert mistake_spans(greedy, c_ids, (1, 2)) == expected
    spec = InsertSpec(policy="mistakes", max_commands=9, n_values=(1, 2))
    _, completion, ns = build_warmup_example(
        "7+5+9", SOLUTION, tokenizer, spec, random.Random(0), student
    )
    assert strip_calls(completion) == SOLUTION and ns == [n for _, n in expected]
    if expected:  # the command sits right before the first token it covers
        q, n = expected[0]
        assert completion.startswith(SOLUTION[:q] + f"<call>{n}</call>")
    with pytest.raises(ValueError, match="needs the student model"):
        build_warmup_example("1", SOLUTION, tokenizer, spec, random.Random(3))


def test_greedy_choices_batched_equal_one_at_a_time(tokenizer, tiny_models):
    from relaypipe.train.warmup import completion_logits, greedy_choices

    student, _ = tiny_models
    texts = [("Q: 7+5\nA: ", "7+5=12\nAnswer: 12"), ("Q: 1+2+3+4\nA: ", SOLUTION)]
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p, _ in texts]
    completions = [tokenizer(c, add_special_tokens=False).input_ids for _, c in texts]
    with torch.no_grad():
        alone = [
            completion_logits(student, p, c).argmax(-1).tolist()
            for p, c in zip(prompts, completions, strict=True)
        ]
    assert greedy_choices(student, prompts, completions, batch_size=2) == alone


def test_sft_keeps_the_teachers_tokens_of_mistakes_rows_out_of_the_loss(tokenizer):
    import pandas as pd

    from relaypipe.stages.sft import sft_dataset

    rows = pd.DataFrame(
        {
            "prompt": ["Q: 7+5\nA: "] * 2,
            "completion": ["7+<call>2</call>5=12\nAnswer: 12", "7+<call>2</call>5=12\nAnswer: 12"],
            "policy": ["mistakes", "random"],
        }
    )
    data = sft_dataset(rows, tokenizer)
    p_len = len(tokenizer("Q: 7+5\nA: ", add_special_tokens=False).input_ids)
    for row, policy in zip(data, rows.policy, strict=True):
        ids, mask = row["input_ids"], row["completion_mask"]
        assert ids[-1] == tokenizer.eos_token_id and mask[:p_len] == [0] * p_len
        masked = tokenizer.decode(
            [t for t, m in zip(ids[p_len:], mask[p_len:], strict=True) if m == 0]
        )
        # mistakes: the 2 tokens after the command ("5=") are the teacher's; random: none
        assert masked == ("5=" if policy == "mistakes" else "")
    # a table with no teacher-written row stays prompt/completion text, as trl tokenizes it
    text = sft_dataset(rows[rows.policy == "random"], tokenizer)
    assert set(text.column_names) == {"prompt", "completion"}
