"""How a backend picks the next token: the sampling parameters and the logit bias.

``Sampling`` is part of the backend protocol (every ``generate`` takes one) and of the server's
request bounds. A request may also carry a *logit bias*, a map from token id to a number added
to that token's logit at every sampling step of the request, before temperature, top-k and
top-p, greedy or not (OpenAI's ``logit_bias``, in logit units). ``-inf`` bans the token;
``+inf`` forces it (every other token is banned; several forced tokens share the mass
equally); NaN is refused (:func:`check_logit_bias`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# The bounds of a valid Sampling, also the server's request bounds (relaypipe.serve.protocol
# imports them from here). Past them sampling breaks in float32: a positive temperature under
# MIN_TEMPERATURE overflows logits / temperature (1e-30: inf - inf = NaN in the softmax), a
# top_p under MIN_TOP_P may round to 0 (below ~1e-45) and drop every token.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-6
MAX_TOP_K = 2**31 - 1


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` is greedy decoding.

    Checked at construction (a ValueError naming the field and the value): ``temperature`` is
    0 or in [MIN_TEMPERATURE, MAX_TEMPERATURE], ``top_p`` in [MIN_TOP_P, 1], ``top_k`` an
    integer in [0, MAX_TOP_K] (0: no cut; the server maps its -1 to 0); no NaN, no infinity,
    no bool.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if not (is_real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                f"{MAX_TEMPERATURE:g}], got {t!r}"
            )
        if not (is_real(p) and MIN_TOP_P <= p <= 1):
            raise ValueError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {p!r}")
        if not (
            isinstance(k, numbers.Integral) and not isinstance(k, bool) and 0 <= k <= MAX_TOP_K
        ):
            raise ValueError(
                f"top_k must be an integer in [0, {MAX_TOP_K}] (0: no top-k cut), got {k!r}"
            )


def check_logit_bias(bias: Mapping[int, float] | None, vocab_size: int | None = None) -> None:
    """Refuse a logit bias no backend can apply: a ValueError naming ``logit_bias``, the token
    and the value. Token ids are integers (not bool) in [0, vocab_size); values are numbers,
    finite or +-inf, not NaN."""
    if bias is None:
        return
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping token id -> bias, got {bias!r}")
    for tok, value in bias.items():
        if not isinstance(tok, numbers.Integral) or isinstance(tok, bool) or tok < 0:
            raise ValueError(f"logit_bias: token ids are integers >= 0, got {tok!r}")
        if vocab_size is not None and tok >= vocab_size:
            raise ValueError(
                f"logit_bias: token id {tok} is outside the vocabulary (size {vocab_size})"
            )
        if not is_real(value) or math.isnan(value):
            raise ValueError(
                f"logit_bias[{tok}] must be a number (finite, or +-inf), got {value!r}"
            )


# A finite logit bias acts as at most this much: larger finite values (up to a double's 1e308)
# would overflow float32, or turn to inf once divided by a low temperature; no logit gap a model
# produces comes near it, so the pick is the same.
MAX_FINITE_BIAS = 1e6


class LogitBias:
    """The logit biases of a batch as dense rows, applied to each step's logits.

    ``add`` holds the finite biases and -inf bans (0 elsewhere); rows with a +inf bias are
    replaced by 0 on their forced tokens and -inf elsewhere (adding +inf would turn softmax
    into NaN). Only built when some request has a bias: an unbiased batch never comes here.
    """

    def __init__(self, biases: Sequence[Mapping[int, float] | None], vocab: int, dev) -> None:
        self.add = torch.zeros((len(biases), vocab), dtype=torch.float32)
        self.force = torch.zeros((len(biases), vocab), dtype=torch.bool)
        for row, bias in enumerate(biases):
            for tok, value in (bias or {}).items():
                if value == math.inf:
                    self.force[row, tok] = True
                elif value == -math.inf:
                    self.add[row, tok] = value
                else:  # beyond float32 (or a hot temperature's division); decisive already
                    self.add[row, tok] = max(-MAX_FINITE_BIAS, min(MAX_FINITE_BIAS, value))
        self.any_force = bool(self.force.any())
        self.add, self.force = self.add.to(dev), self.force.to(dev)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Biased float32 logits [R, V] of the batch rows ``rows`` (indices into the batch).
        Float32 is exact for the unbiased rows (x + 0 == x), so their picks do not change."""
        out = logits.float() + self.add[rows]
        if self.any_force:
            force = self.force[rows]
            forced = torch.where(force, 0.0, float("-inf"))
            out = torch.where(force.any(dim=-1, keepdim=True), forced, out)
        return out


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a [V] logits row."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
