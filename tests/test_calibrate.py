"""relaypipe.calibrate: bisection on the call bias to a target teacher share, reported points,
unreachable targets, and the JSON kept in the model directory.

A scripted student whose share is a known step function of the bias (request i calls iff the
bias reaches its threshold) checks the search exactly; the tiny micro models (a real student
deciding when to call, its command bodies scripted) check it on a noisy, sampled share."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable

import pytest

from relaypipe.calibrate import (
    CALIBRATION_FILE,
    CalibrationResult,
    calibrate,
    read_calibration,
    teacher_share,
    write_calibration,
)
from relaypipe.relay.backends import GenResult
from relaypipe.relay.decoder import RelayConfig, RelayDecoder
from relaypipe.relay.grammar import CALL_OPEN
from relaypipe.relay.sampling import Sampling
from relaypipe.relay.transformers_backend import TransformersBackend
from relaypipe.tasks.base import Problem
from tests.test_call_bias import CommandBodies

N = 20
THRESHOLDS = [-9.5 + i for i in range(N)]  # request i calls iff bias >= THRESHOLDS[i]


def problems(n: int) -> list[Problem]:
    return [
        Problem(f"p{i}", "arith", 1, f"{i}+{3 * i % 17}", str(i + 3 * i % 17)) for i in range(n)
    ]


class ThresholdStudent:
    """Request i writes ``<call>4</call>z<eos>`` if the bias on ``<call>`` (0 without one)
    reaches ``thresholds[i]``, else ``abz<eos>``: with the teacher's 4 tokens a caller
    generates 9 tokens, 4 of them the teacher's, a non-caller 4, none. Decided at the request's
    first call, streamed (cut at stop tokens) like a model."""

    supports_logit_bias = True

    def __init__(self, tokenizer, thresholds):
        self.tok = tokenizer
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])
        self.open = tokenizer.convert_tokens_to_ids(CALL_OPEN)
        self.thresholds = thresholds
        self.streams: dict[Hashable, list[int]] = {}

    def generate(self, requests, *, stop_token_ids=frozenset(), sampling=Sampling()):
        out = []
        for r in requests:
            if r.key not in self.streams:
                bias = (r.logit_bias or {}).get(self.open, 0.0)
                text = "<call>4</call>z<eos>" if bias >= self.thresholds[r.key[1]] else "abz<eos>"
                self.streams[r.key] = self.tok(text, add_special_tokens=False).input_ids
            stream, toks, finish = self.streams[r.key], [], "length"
            while stream and len(toks) < r.max_new_tokens:
                toks.append(stream.pop(0))
                if toks[-1] in stop_token_ids:
                    finish = "stop"
                    break
                if toks[-1] in self.eos_token_ids:
                    finish = "eos"
                    break
            out.append(GenResult(toks, finish, len(r.context)))
        return out

    def release(self, key: Hashable) -> None:
        self.streams.pop(key, None)


class ConstantTeacher:
    """Always ``tttt`` (cut to the grant)."""

    def __init__(self, tokenizer):
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])
        self.reply = tokenizer("tttt", add_special_tokens=False).input_ids

    def generate(self, requests, *, stop_token_ids=frozenset(), sampling=Sampling()):
        return [GenResult(self.reply[: r.max_new_tokens], "length", 1) for r in requests]

    def release(self, key: Hashable) -> None:
        pass


def known_share(bias: float) -> float:
    k = sum(bias >= t for t in THRESHOLDS)
    return 4 * k / (5 * k + 4 * N)


@pytest.fixture
def scripted(tokenizer):
    return RelayDecoder(
        ThresholdStudent(tokenizer, THRESHOLDS), ConstantTeacher(tokenizer), tokenizer
    )


CFG = RelayConfig(max_new_tokens=32)


@pytest.mark.parametrize("target, calls", [(0.1, 2), (0.4, 16), (0.3, 10), (0.0, 0), (0.444, 20)])
def test_reaches_targets_of_a_known_share(scripted, target, calls):
    res = calibrate(scripted, problems(N), target_share=target, config=CFG, tol=0.02)
    assert res.reached, res.message
    assert abs(res.share - target) <= 0.02
    assert res.share == pytest.approx(known_share(res.bias))
    assert sum(res.bias >= t for t in THRESHOLDS) in (calls - 1, calls, calls + 1)
    # every decode is reported, in order, with the share the script implies
    assert res.points[0].bias == 0.0  # the student as trained first
    assert len(res.points) == len({p.bias for p in res.points}) <= 12 + 2
    for p in res.points:
        assert p.share == pytest.approx(known_share(p.bias))
        assert p.generated_tokens > 0 and p.teacher_tokens == round(p.share * p.generated_tokens)
        assert 0.0 <= p.accuracy <= 1.0
    assert (res.bias, res.share) in [(p.bias, p.share) for p in res.points]
    assert "gives teacher share" in res.message
    assert res.n_problems == N and res.config["mode"] == "relay" and "call_bias" not in res.config


def test_bisection_path_is_the_expected_one(scripted):
    res = calibrate(scripted, problems(N), target_share=0.1, config=CFG, tol=0.02)
    assert [p.bias for p in res.points] == [0.0, -20.0, -10.0, -5.0, -7.5, -8.75, -8.125]
    assert res.bias == -8.125 and res.share == pytest.approx(8 / 90)


def test_unreachable_above(scripted):
    res = calibrate(scripted, problems(N), target_share=0.6, config=CFG, tol=0.02)
    assert not res.reached
    assert res.bias == 20.0 and res.share == pytest.approx(80 / 180)
    assert "out of reach" in res.message and "largest bias +20" in res.message
    assert [p.bias for p in res.points] == [0.0, 20.0]


def test_unreachable_below(scripted):
    res = calibrate(scripted, problems(N), target_share=0.0, config=CFG, tol=0.01, lo=-5.0)
    assert not res.reached
    assert res.bias == -5.0 and res.share == pytest.approx(known_share(-5.0)) and res.share > 0.1
    assert "smallest bias -5" in res.message


def test_a_jump_over_the_target_band_is_reported(scripted):
    # the shares for 2 and 3 callers are 0.0889 and 0.1263: nothing within 0.005 of 0.107
    res = calibrate(scripted, problems(N), target_share=0.107, config=CFG, tol=0.005, max_iters=60)
    assert not res.reached
    assert "jumps" in res.message
    assert res.share == pytest.approx(8 / 90)  # the closer of the two
    assert -8.5 <= res.bias < -7.5


def test_max_iters_bounds_the_decodes(scripted):
    res = calibrate(scripted, problems(N), target_share=0.1, config=CFG, tol=0.02, max_iters=2)
    assert not res.reached and "after 2 bisection steps" in res.message
    assert len(res.points) == 4
    assert res.share == min((p.share for p in res.points), key=lambda s: abs(s - 0.1))


def test_a_range_that_starts_at_lo_cannot_go_lower(scripted):
    # lo = 0: the start is lo itself, and a share above the target cannot come down
    res = calibrate(scripted, problems(N), target_share=0.0, config=CFG, tol=0.01, lo=0.0)
    assert not res.reached and [p.bias for p in res.points] == [0.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_share": 1.5}, "target_share"),
        ({"target_share": float("nan")}, "target_share"),
        ({"config": RelayConfig(mode="student")}, "no effect in mode 'student'"),
        ({"config": RelayConfig(mode="random_router")}, "no effect"),
        ({"lo": 3.0, "hi": 3.0}, "lo < hi"),
        ({"hi": math.inf}, "lo < hi"),
        ({"tol": 0.0}, "tol"),
        ({"max_iters": -1}, "max_iters"),
        ({"min_step": 0.0}, "min_step"),
    ],
)
def test_bad_arguments_are_refused(scripted, kwargs, match):
    args = {"target_share": 0.2, "config": CFG, **kwargs}
    with pytest.raises(ValueError, match=match):
        calibrate(scripted, problems(4), **args)
    with pytest.raises(ValueError, match="at least one problem"):
        calibrate(scripted, [], target_share=0.2, config=CFG)


def test_fixed_help_is_calibrated_too(scripted):
    res = calibrate(
        scripted,
        problems(N),
        target_share=0.2,
        config=RelayConfig(mode="fixed_help", fixed_n=4, max_new_tokens=32),
        tol=0.02,
    )
    assert res.reached and res.config["mode"] == "fixed_help"


# ------------------------------------------------------------------ the tiny micro models
@pytest.fixture
def real(tiny_models, tokenizer):
    student, teacher = tiny_models
    return RelayDecoder(
        CommandBodies(TransformersBackend(student), tokenizer),
        TransformersBackend(teacher),
        tokenizer,
    )


HOT = Sampling(temperature=1.0)
REAL_CFG = RelayConfig(max_new_tokens=24, seed=5, student_sampling=HOT, teacher_sampling=HOT)


@pytest.mark.parametrize("target", [0.2, 0.45])
def test_real_tiny_models_reach_a_target_share(real, target):
    probs = problems(32)
    res = calibrate(real, probs, target_share=target, config=REAL_CFG, tol=0.03)
    assert res.reached, res.message
    assert abs(res.share - target) <= 0.03
    assert res.bias > 0  # the untrained student hardly calls by itself
    # the reported share is what a decode with that bias realises (the seed fixes it)
    again = [g.trace for g in _decode(real, probs, res.apply(REAL_CFG))]
    assert teacher_share(again)[0] == pytest.approx(res.share)
    assert len(res.points) >= 2


def test_real_calibration_is_reproducible(real):
    probs = problems(24)
    a = calibrate(real, probs, target_share=0.3, config=REAL_CFG, tol=0.03)
    b = calibrate(real, probs, target_share=0.3, config=REAL_CFG, tol=0.03)
    assert a == b


def _decode(decoder, probs, cfg):
    from relaypipe.evaluate.run import decode_problems

    return decode_problems(decoder, probs, cfg)


# ------------------------------------------------------------------ stored with the model
def test_write_read_round_trip(scripted, tmp_path):
    assert read_calibration(tmp_path) is None
    res = calibrate(scripted, problems(N), target_share=0.6, config=CFG, tol=0.02)
    path = write_calibration(tmp_path / "model", res)
    assert path == tmp_path / "model" / CALIBRATION_FILE
    back = read_calibration(tmp_path / "model")
    assert back == res
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["reached"] is False and data["bias"] == 20.0
    assert [p["bias"] for p in data["points"]] == [0.0, 20.0]
    assert back.apply(RelayConfig(mode="fixed_help")).call_bias == 20.0
    assert not list((tmp_path / "model").glob(".*tmp*"))  # atomic: no temporaries left


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a call-bias calibration"),
        ('{"format": 2}', "not a call-bias calibration"),
        ('{"format": 1, "bias": 1.0}', "not a valid calibration"),
    ],
)
def test_a_bad_calibration_file_names_itself(tmp_path, content, match):
    (tmp_path / CALIBRATION_FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_calibration(tmp_path)
    assert CALIBRATION_FILE in str(err.value)


def test_from_dict_rejects_bad_points():
    with pytest.raises(TypeError):
        CalibrationResult.from_dict(
            {
                "target_share": 0.1,
                "tol": 0.01,
                "bias": 0.0,
                "share": 0.0,
                "accuracy": 0.0,
                "reached": False,
                "message": "",
                "points": [{"bias": 0.0}],
                "n_problems": 1,
                "lo": -1.0,
                "hi": 1.0,
                "config": {},
            }
        )
