"""Shared fixtures: the character tokenizer and tiny random micro models (built locally)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from relaypipe.micro.models import ModelSize, build_model
from relaypipe.micro.tokenizer import build_char_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    """An untrained (student, teacher) pair: enough to exercise real forward passes fast."""
    student = build_model(ModelSize(32, 1, 2, 64), tokenizer, seed=1).eval()
    teacher = build_model(ModelSize(48, 2, 4, 96), tokenizer, seed=2).eval()
    return student, teacher


# Property tests time single examples; on a loaded 2-core machine one can exceed hypothesis's
# 200 ms deadline without anything being wrong, which it reports as a flaky failure.
settings.register_profile("relaypipe", deadline=None)
settings.load_profile("relaypipe")
