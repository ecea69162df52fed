"""The oracle caller's decode (relaypipe/evaluate/oracle.py): when it hands a step to the teacher
(hand-computed on scripted models), the relay's budgets, its accounting, and on tiny real
models: a student that agrees with the teacher never calls, one that always disagrees writes
the teacher's greedy answer within the budgets."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from relaypipe.evaluate.oracle import OracleLimits, oracle_decode

V = 6  # the scripted models' vocabulary: 0 pad, 1 eos, 2..5 text
EOS, PAD = 1, 0


class Scripted(torch.nn.Module):
    """A language model whose next-token distribution at generation step j is ``probs[j]``
    (the last one from there on; the same for every row), whatever it reads; it checks the
    mask and positions the oracle feeds it."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for the oracle to read
        self.logits = torch.tensor(probs).log()  # [steps, V]
        self.fed: list[list[int]] = []  # the token ids fed at each call, per row
        self.read = 0  # columns of the attention mask so far

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep):
        step = 0 if cache is None else cache  # the "cache" counts the calls
        if cache is None:
            self.read, self.fed = 0, []  # a new decode
        # the mask covers every token read so far; positions go on from the prompt's
        assert attention_mask.shape == (input_ids.shape[0], self.read + input_ids.shape[1])
        assert (position_ids[:, -1] == attention_mask.sum(-1) - 1).all()
        self.read = attention_mask.shape[1]
        self.fed.append(input_ids[:, -1].tolist())
        logits = self.logits[min(step, len(self.logits) - 1)].expand(input_ids.shape[0], 1, V)
        return SimpleNamespace(logits=logits, cache=step + 1)


def one_hot(token: int, p: float = 0.9) -> list[float]:
    """A distribution with ``p`` on ``token`` and the rest spread over the other ids."""
    return [p if i == token else (1 - p) / (V - 1) for i in range(V)]


def with_p(top: int, other: int, p_other: float) -> list[float]:
    """The teacher's distribution: ``top`` most likely, ``other`` (the student's token) at
    exactly ``p_other``."""
    rest = (1 - 0.6 - p_other) / (V - 2)
    return [0.6 if i == top else p_other if i == other else rest for i in range(V)]


UNBOUNDED = OracleLimits(max_new_tokens=10, max_call_tokens=8)


def decode(student, teacher, taus, limits=UNBOUNDED, prompts=None):
    prompts = prompts or [[2, 3]] * len(taus)
    return oracle_decode(student, teacher, prompts, taus, limits, eos_ids={EOS}, pad_id=PAD)


def test_the_teacher_writes_where_it_disagrees_and_gives_the_students_token_under_tau():
    # student: 2 2 3 3 eos. teacher: prefers 4 at steps 0 and 2 (giving the student's token
    # 0.05 and 0.2), agrees at steps 1 and 3, and at step 4 prefers 5 to eos (eos at 0.3)
    student = Scripted([one_hot(2), one_hot(2), one_hot(3), one_hot(3), one_hot(EOS)])
    teacher = Scripted(
        [with_p(4, 2, 0.05), one_hot(2), with_p(4, 3, 0.2), one_hot(3), with_p(5, EOS, 0.3)]
    )
    never, confident, every = decode(student, teacher, [0.0, 0.1, 1.0])
    assert never.token_ids == [2, 2, 3, 3, EOS] and never.n_teacher == 0 and never.calls == 0
    # tau .1: only step 0 (.05 < .1); steps 2 (.2) and 4 (.3) stay the student's
    assert confident.token_ids == [4, 2, 3, 3, EOS]
    assert confident.teacher == [True, False, False, False, False] and confident.calls == 1
    # tau 1: every disagreement; step 4 is the teacher's 5, then 10 tokens end the request
    assert every.token_ids[:5] == [4, 2, 4, 3, 5]
    assert every.teacher[:5] == [True, False, True, False, True]
    assert every.calls == 3 and every.stop_reason == "max_new_tokens"
    assert never.stop_reason == confident.stop_reason == "eos"


def test_a_threshold_between_the_two_probabilities_splits_them():
    student = Scripted([one_hot(2)] * 3 + [one_hot(EOS)])
    teacher = Scripted([with_p(4, 2, 0.05), with_p(4, 2, 0.2), with_p(4, 2, 0.01), one_hot(EOS)])
    # probabilities .05, .2, .01 of the student's 2: tau .06 takes steps 0 and 2, tau .3 all three
    low, high = decode(student, teacher, [0.06, 0.3])
    assert low.teacher[:3] == [True, False, True] and low.calls == 2
    assert high.teacher[:3] == [True, True, True] and high.calls == 1  # one run, one call
    # the same threshold gives the same decode, whatever the batch
    (alone,) = decode(copy.deepcopy(student), copy.deepcopy(teacher), [0.06])
    assert alone.token_ids == low.token_ids


def contrary(steps: int = 12) -> tuple[Scripted, Scripted]:
    """The student always writes 2, the teacher always 4 (giving 2 a probability of .01)."""
    return Scripted([one_hot(2)] * steps), Scripted([with_p(4, 2, 0.01)] * steps)


@pytest.mark.parametrize(
    ("limits", "teacher_at", "calls"),
    [
        # runs of at most 3 teacher tokens: 10 steps, 4 calls (3 + 3 + 3 + 1)
        (OracleLimits(10, max_call_tokens=3), list(range(10)), 4),
        # 5 teacher tokens per request, then the student writes the rest
        (OracleLimits(10, max_call_tokens=3, max_teacher_tokens=5), list(range(5)), 2),
        # 2 calls of at most 3 tokens
        (OracleLimits(10, max_call_tokens=3, max_calls=2), list(range(6)), 2),
        # max_turns 2: one hand-off, so the student's runs stay within 2 turns
        (OracleLimits(10, max_call_tokens=3, max_turns=2), list(range(3)), 1),
        # a spent budget of 0 refuses every step
        (OracleLimits(10, max_call_tokens=3, max_teacher_tokens=0), [], 0),
    ],
)
def test_the_relays_budgets_hold(limits, teacher_at, calls):
    (tr,) = decode(*contrary(), [1.0], limits)
    assert [i for i, t in enumerate(tr.teacher) if t] == teacher_at
    assert tr.calls == calls
    assert tr.refused == 10 - len(teacher_at)  # every other step it would have handed over
    assert tr.token_ids == [4 if t else 2 for t in tr.teacher]
    assert tr.n_generated == 10 and tr.stop_reason == "max_new_tokens"


def test_accounting_counts_what_each_model_read():
    # prompt of 2; student 2, teacher 4 (tau 1 hands over every step); max_teacher_tokens 2
    (tr,) = decode(*contrary(), [1.0], OracleLimits(4, max_call_tokens=8, max_teacher_tokens=2))
    assert tr.teacher == [True, True, False, False]
    assert (tr.n_teacher, tr.n_student, tr.prompt_tokens) == (2, 2, 2)
    # each model read the prompt and the first 3 tokens (the last is never fed back):
    # the student read the teacher's 2, the teacher the student's first one
    assert tr.student_prefill_tokens == 2 + 2
    assert tr.teacher_prefill_tokens == 2 + 1
    # a teacher without a cache reads the transcript at each of the 4 steps: 2 + 3 + 4 + 5
    assert tr.teacher_context_tokens == 14


def test_left_padding_and_the_fed_tokens():
    student, teacher = contrary(3)
    trs = oracle_decode(
        student,
        teacher,
        [[2, 3, 4], [5]],
        [1.0, 0.0],
        OracleLimits(3, max_call_tokens=8),
        eos_ids={EOS},
        pad_id=PAD,
    )
    assert [t.token_ids for t in trs] == [[4, 4, 4], [2, 2, 2]]
    # both models read the same transcript: the prompts' last tokens, then each row's token
    assert student.fed == teacher.fed == [[4, 5], [4, 2], [4, 2]]


def test_bad_arguments_are_refused():
    student, teacher = contrary()
    with pytest.raises(ValueError, match="2 prompts but 1 thresholds"):
        oracle_decode(student, teacher, [[2], [3]], [0.5], UNBOUNDED, eos_ids={EOS}, pad_id=PAD)
    for tau in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"thresholds must be in \[0, 1\]"):
            decode(student, teacher, [tau])
    with pytest.raises(ValueError, match="empty prompt"):
        decode(student, teacher, [0.5], prompts=[[]])
    with pytest.raises(ValueError, match="max_call_tokens must be >= 1"):
        OracleLimits(10, max_call_tokens=0)
    with pytest.raises(ValueError, match="max_calls must be >= 0"):
        OracleLimits(10, max_call_tokens=1, max_calls=-1)


# ----------------------------------------------------------------------- tiny real models


def greedy(model, prompt: list[int], n: int, banned: list[int]) -> list[int]:
    """The model's greedy continuation, no cache, the tags banned (as the oracle bans them)."""
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(input_ids=ids).logits[0, -1]
        logits[banned] = -math.inf
        out.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


@pytest.fixture(scope="module")
def pair(tiny_models, tokenizer):
    student, teacher = tiny_models
    contrary = copy.deepcopy(student)
    with torch.no_grad():  # random tied-embedding models echo their input; this one never does
        contrary.model.norm.weight.neg_()
    tags = tokenizer.convert_tokens_to_ids(["<call>", "</call>"])
    prompts = [
        tokenizer(q, add_special_tokens=False).input_ids
        for q in ("Q: 1+2+3=?\nA:", "Q: 12+7+8+9+4=?\n")
    ]
    return SimpleNamespace(teacher=teacher, contrary=contrary, tags=tags, prompts=prompts)


def real_decode(tokenizer, student, teacher, prompts, taus, limits, tags):
    return oracle_decode(
        student,
        teacher,
        prompts,
        taus,
        limits,
        eos_ids={tokenizer.eos_token_id},
        pad_id=tokenizer.pad_token_id,
        banned_ids=tags,
    )


def test_a_student_that_agrees_with_the_teacher_never_calls(pair, tokenizer):
    limits = OracleLimits(12, max_call_tokens=4)
    trs = real_decode(
        tokenizer, pair.teacher, pair.teacher, pair.prompts, [1.0, 1.0], limits, pair.tags
    )
    assert [t.n_teacher for t in trs] == [0, 0] and [t.calls for t in trs] == [0, 0]
    for prompt, tr in zip(pair.prompts, trs, strict=True):
        assert tr.token_ids == greedy(pair.teacher, prompt, 12, pair.tags)


def test_a_student_that_always_disagrees_writes_the_teachers_answer(pair, tokenizer):
    # unbounded: every token is the teacher's, and the transcript is its greedy answer
    limits = OracleLimits(12, max_call_tokens=4)
    trs = real_decode(
        tokenizer, pair.contrary, pair.teacher, pair.prompts, [1.0, 1.0], limits, pair.tags
    )
    for prompt, tr in zip(pair.prompts, trs, strict=True):
        assert tr.token_ids == greedy(pair.teacher, prompt, 12, pair.tags)
        assert all(tr.teacher) and tr.calls == 3  # 12 tokens in runs of at most 4
    # within the relay's budgets: 5 teacher tokens, 2 calls, 4 per call
    limits = OracleLimits(12, max_call_tokens=4, max_teacher_tokens=5, max_calls=2)
    trs = real_decode(
        tokenizer, pair.contrary, pair.teacher, pair.prompts, [1.0, 1.0], limits, pair.tags
    )
    for tr in trs:
        assert tr.teacher == [True] * 5 + [False] * 7
        assert tr.calls == 2 and tr.refused == 7
    # tau 0 never calls: the contrary student's own greedy answer
    (alone,) = real_decode(
        tokenizer, pair.contrary, pair.teacher, pair.prompts[:1], [0.0], limits, pair.tags
    )
    assert alone.n_teacher == 0
    assert alone.token_ids == greedy(pair.contrary, pair.prompts[0], 12, pair.tags)
