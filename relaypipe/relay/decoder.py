"""The relay decoder: a batch of requests shared between a student and a teacher backend.

Per request (DESIGN.md §1): the student samples until it closes a command (``</call>``), ends,
or hits a bound. A command ``<call>n</call>`` hands the pen to the teacher, which continues the
*teacher's view* (prompt + everything generated, commands removed) for up to ``n`` tokens; its
tokens join both views and the student resumes. The student's view keeps its own command, so
it knows it asked.

Scheduling is continuous (:mod:`relaypipe.relay.lanes`): with in-process models every step is
one batched student forward for all requests currently with the student and one batched teacher
forward for all requests currently with the teacher; a request that closes a command joins the
teacher's next step, one whose teacher span ends joins the student's next step, and nobody
waits for a batch-mate. A model behind a URL gets each request as its own call (its engine
batches them). Every request has its own RNG streams, so its tokens are the same whatever the
schedule, batch and batch-mates (floating-point noise aside).

On one device the two models' forwards take turns, so every teacher forward stalls every
request, and a hand-off's teacher forward is mostly the prefill of what the student wrote since
the teacher last saw it. ``teacher_hold`` lets a new hand-off wait while the student has work,
up to that many student steps (or until the teacher is mid-run anyway), so that hand-offs
share teacher forwards; ``"auto"`` (the default) holds as many student steps as one teacher
step takes (measured as the decode goes). A lone request never waits: with the student idle
the teacher runs at once. Measured on the realistic bench pair (random router, 5 %, batch 8):
``relaypipe bench`` in docs/lab-notes.md. ``schedule="rounds"`` keeps the
earlier schedule for comparison (``relaypipe bench --schedule rounds``): all requests with the
student take one batched call until each stops, then all with the teacher take one.

Modes:
  relay          commands are honoured (within budgets)
  student        commands are blocked: the student alone (the paper's teacher-free mode)
  teacher        the teacher writes everything
  random_router  each next token goes to the teacher with probability ``router_p``
  fixed_help     every call gets ``fixed_n`` tokens whatever n it asked for

Budgets. ``max_teacher_tokens`` (teacher tokens per request) and ``max_calls`` (hand-offs per
request, each hand-off that runs being one call) hold in every mode; ``max_new_tokens`` bounds
all generated tokens. How a mode meets a spent budget:

* relay, fixed_help: a command past a budget is refused (a ``budget`` event) or clipped (a
  ``clipped`` event), and the student goes on.
* random_router: a run the router draws is granted at most the teacher tokens left (the
  hand-off's ``requested`` is the drawn run, ``granted`` the clipped one). Once either budget
  is spent the router gives the teacher no more tokens and the student writes the rest of the
  request (up to ``max_new_tokens``). These are no commands, so no event is recorded. While
  the budgets are not binding the router's draws, and so the tokens, are what they are without
  them.
* teacher: the one call is granted ``min(max_new_tokens, max_teacher_tokens)`` tokens. When
  the teacher has written its budget the request ends with stop reason ``max_teacher_tokens``;
  with ``max_calls == 0`` (or ``max_teacher_tokens == 0``) it ends before any token with stop
  reason ``max_calls`` (``max_teacher_tokens``). Like ``max_new_tokens`` and ``max_turns``
  these are exhausted bounds, not ends of sequence (the server reports ``finish_reason
  "length"``).

What the teacher sees. In every mode and at every hand-off the teacher's view holds no call
tag and no part of a command:

* A command is marked (Source.COMMAND) from its open tag through its close tag, whether it is
  honoured, blocked, refused, clipped or malformed; a stray close tag alone is marked too.
* A hand-off inside an open command (only the random router can do it: in the other modes the
  student hands over by closing a command) *abandons* the command: its tokens so far, from the
  first unclosed ``<call>`` of the student's current run to the hand-off, are marked and
  recorded as an ``unterminated`` event, and the teacher continues the text before the
  command. The router does not wait for the close tag: waiting would move teacher tokens to
  right after the student's commands, where the student wanted help, and so leak the
  student's calls into a baseline that must place its help blindly. Its draws, the hand-off
  positions and the teacher's run lengths are what they are without commands; only the
  teacher's view changes. Accounting follows the tokens: the abandoned tokens stay the
  student's (``n_student``, ``n_command``), the teacher's run is counted in full, as before. The
  student resumes from its own view, the abandoned part included; a ``</call>`` it writes later
  has no open tag in its run and is a malformed stray close.
* Tag tokens the decoder did not mark (the teacher's own: it shares the vocabulary) are left
  out of the teacher's view but stay the teacher's tokens in the trace.
* The decoder honours only the tag *tokens*. Ordinary tokens that spell a tag as text
  (``<``, ``call``, ``>``) are no command and nobody's call, but the teacher does not see them
  either, nor a partial spelling (``<ca``) that ends its view and could become one. A bare
  ``<`` ending the text at a hand-off is hidden for the same reason, even where it was a
  less-than sign. The prompt is passed as it is.

:meth:`RelayTrace.teacher_view_ids` with the tag ids and the tokenizer's text of each token
rebuilds exactly the context of any hand-off from the trace cut at its start.

Call bias (``RelayConfig.call_bias``): a number added to the student's logit of the open tag
``<call>`` at its sampling steps, moving a trained student's propensity to call without
retraining (positive: more calls, negative: fewer; :mod:`relaypipe.calibrate` finds the bias
that gives a target teacher share). ``0`` (the default) is today's decode, token for token.

* Where: only the student, only in the modes where its calls are honoured (relay,
  fixed_help). In student, teacher and random_router modes it has no effect at all (the
  student's calls are blocked or there is no student choice to move): the decode is the one
  with ``call_bias = 0``.
* When: at every student step *outside* a command, while the request's budgets allow another
  call (``max_calls``/``max_teacher_tokens`` not spent; a spent budget refuses every command,
  so the bias would only make the student write commands nobody answers). Inside a command
  (after its ``<call>``, through ``</call>``) the student writes the body unbiased: a biased
  open tag there would only nest a malformed command. To know where a command opens, every
  student call of a biased decode also stops at ``<call>``; the decoder resumes the student in
  the next round, within the same turn (``turns`` and ``max_turns`` count it once), unbiased
  until the command closes. Tokens come from the same per-request RNG, so the split changes
  nothing but the bias (and costs a round per command).
* How: the student request carries ``GenRequest.logit_bias = {open_id: call_bias}`` (OpenAI's
  ``logit_bias``, in logit units), applied by the backend before temperature, top-k and top-p,
  greedy or sampled; the student backend must have ``supports_logit_bias`` (the in-process
  backend does, and :class:`~relaypipe.relay.http_backend.HTTPBackend`, which sends it as
  OpenAI's ``logit_bias``, its values clamped to [-100, 100] as such servers do), else a
  non-zero bias is refused before decoding.
* ``-inf`` never opens a command, so the student never calls (the open tag is banned; a
  stray ``</call>`` it may still write is a malformed stray close, as without a bias);
  ``+inf`` opens one at every step where the bias applies (the student writes nothing but
  commands while budgets last). NaN is refused (a ValueError naming ``call_bias``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count

import torch
from transformers import PreTrainedTokenizerBase

from relaypipe.relay.backends import Backend, GenRequest, GenResult
from relaypipe.relay.grammar import CALL_CLOSE, CALL_OPEN, MalformedCall, parse_call_body
from relaypipe.relay.lanes import Lane, open_lane, wait_for_any
from relaypipe.relay.sampling import Sampling, is_real
from relaypipe.relay.trace import CallEvent, HandOff, RelayTrace, Source, StopReason

log = logging.getLogger(__name__)

MODES = ("relay", "student", "teacher", "random_router", "fixed_help")
SCHEDULES = ("continuous", "rounds")  # RelayDecoder(schedule=...): see the module docstring
CALL_MODES = ("relay", "fixed_help")  # the modes that honour the student's calls (call_bias)
_decode_ids = count()


@dataclass(frozen=True)
class RelayConfig:
    """Bounds, budgets and mode of a relay decode."""

    mode: str = "relay"  # one of MODES
    max_new_tokens: int = 256  # generated tokens per request, all sources together
    max_turns: int = 32  # student rounds per request
    max_call_tokens: int = 64  # the largest n one call is granted; larger requests are clipped
    # per-request budgets, every mode (None: unbounded); a hand-off of the random router or of
    # teacher mode is a call too (module docstring, "Budgets")
    max_teacher_tokens: int | None = None  # teacher tokens
    max_calls: int | None = None  # hand-offs
    router_p: float = 0.0  # random_router: probability that a token is the teacher's
    fixed_n: int = 8  # fixed_help: tokens granted per call
    student_sampling: Sampling = field(default_factory=Sampling)
    teacher_sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    # added to the student's <call> logit outside commands, relay/fixed_help only (module
    # docstring, "Call bias"); 0: no bias, -inf: never call, +inf: call whenever allowed
    call_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("max_new_tokens", "max_turns", "max_call_tokens", "fixed_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_teacher_tokens", "max_calls"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if not 0.0 <= self.router_p <= 1.0:
            raise ValueError(f"router_p must be in [0, 1], got {self.router_p}")
        if not is_real(self.call_bias) or math.isnan(self.call_bias):
            raise ValueError(
                f"call_bias must be a number (finite, or +-inf), got {self.call_bias!r}"
            )

    @property
    def biased(self) -> bool:
        """Whether ``call_bias`` acts in this config (non-zero, in a mode with calls)."""
        return self.call_bias != 0 and self.mode in CALL_MODES


@dataclass
class _State:
    trace: RelayTrace
    student_gen: torch.Generator
    teacher_gen: torch.Generator
    router: random.Random
    key: tuple[int, int]
    phase: str = "student"  # "student" | "teacher" | "done"
    grant: int = 0  # tokens granted to the pending teacher call
    requested: int = 0
    next_router_switch: int = 0  # random_router: generated-token index of the next teacher token
    started: float = 0.0
    submitted: float = 0.0  # when its current backend request was submitted
    request: GenRequest | None = None  # its current backend request
    split: bool = False  # call_bias: the last student call stopped at <call>; its turn goes on


class _Pace:
    """How long the student's and the teacher's steps take (moving averages), for the
    teacher's automatic hold: new hand-offs may wait as many student steps as one teacher
    step costs, so that several share the teacher's forward (module docstring)."""

    def __init__(self) -> None:
        self.seconds: list[float | None] = [None, None]  # student, teacher

    def add(self, teacher: bool, seconds: float) -> None:
        old = self.seconds[teacher]
        self.seconds[teacher] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def hold(self) -> int:
        student, teacher = self.seconds
        if not student or teacher is None:
            return 0
        return min(64, round(teacher / student))


class RelayDecoder:
    """Decode prompts with a student and a teacher that share one vocabulary."""

    def __init__(
        self,
        student: Backend,
        teacher: Backend,
        tokenizer: PreTrainedTokenizerBase,
        config: RelayConfig | None = None,
        schedule: str = "continuous",
        teacher_hold: int | str = "auto",
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        self.schedule = schedule
        if teacher_hold != "auto" and not (isinstance(teacher_hold, int) and teacher_hold >= 0):
            raise ValueError(f"teacher_hold must be 'auto' or an integer >= 0: {teacher_hold!r}")
        self.teacher_hold = teacher_hold
        self.student = student
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.config = config or RelayConfig()
        ids = tokenizer.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError(
                f"the tokenizer does not know {CALL_OPEN!r}/{CALL_CLOSE!r} as tokens; add them "
                "with relaypipe.models.add_call_tokens() before decoding"
            )
        self.open_id, self.close_id = ids
        self._pieces: dict[int, str] = {}  # token id -> its text (for spelled-out tags)

    # ------------------------------------------------------------------ public API
    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        config: RelayConfig | None = None,
        first_id: int = 0,
        max_batch: int | None = None,
    ) -> list[RelayTrace]:
        """Relay-decode a batch of tokenised prompts; one trace per prompt, in order.

        Request ``first_id + i`` gets its own RNG streams from (seed, request id), so a run
        split into several batches samples exactly as one big batch would.

        ``max_batch``: at most that many requests decoding at once (with either model); the
        others wait and join, in order, as requests finish (a server's continuous batching: no
        batch waits for its slowest request). None: all at once. The tokens are the same.
        """
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        cfg = config or self.config
        if cfg.biased and not getattr(self.student, "supports_logit_bias", False):
            raise ValueError(
                f"call_bias={cfg.call_bias} needs a student backend that honours "
                f"GenRequest.logit_bias (supports_logit_bias); {type(self.student).__name__} "
                "does not"
            )
        batch_id = next(_decode_ids)
        t0 = time.perf_counter()
        states = [
            self._new_state(first_id + i, list(p), cfg, batch_id, t0) for i, p in enumerate(prompts)
        ]
        # with a call bias the student also stops at an open tag: the body is written unbiased
        stops = [self.close_id, self.open_id] if cfg.biased else [self.close_id]
        rounds = self.schedule == "rounds"
        student = open_lane(self.student, frozenset(stops), cfg.student_sampling, rounds)
        auto = self.teacher_hold == "auto"
        hold = 0 if auto else int(self.teacher_hold)
        teacher = open_lane(
            self.teacher, frozenset(), cfg.teacher_sampling, rounds, hold, full=max_batch
        )
        pace = _Pace() if auto else None
        waiting = deque(states)

        def admit() -> None:
            """Start waiting requests while fewer than ``max_batch`` are decoding."""
            while waiting:
                if max_batch is not None and len(student) + len(teacher) >= max_batch:
                    return
                st = waiting.popleft()
                st.started = time.perf_counter()
                self._dispatch(st, cfg, student, teacher)

        by_key = {s.key: s for s in states}
        tokens = sum(len(p) + cfg.max_new_tokens for p in prompts)
        for backend in {id(b): b for b in (self.student, self.teacher)}.values():
            estimate = getattr(backend, "log_memory_estimate", None)
            if callable(estimate):  # the most key/value memory this decode may take
                estimate(len(states), tokens)
        try:
            admit()
            while len(student) or len(teacher) or waiting:
                computed = False
                for lane, after, other in (
                    (student, self._after_student, teacher),
                    (teacher, self._after_teacher, student),
                ):
                    if not lane.due(len(other) > 0 or bool(waiting)):
                        continue
                    computed |= lane.computes and len(lane) > 0
                    t = time.perf_counter()
                    done = lane.poll()
                    if pace is not None and lane.computes:
                        pace.add(lane is teacher, time.perf_counter() - t)
                        teacher.hold = pace.hold()
                    for key, res in done:
                        st = by_key[key]
                        after(st, res, cfg)
                        self._dispatch(st, cfg, student, teacher)
                    admit()
                if not computed and (len(student) or len(teacher)):
                    wait_for_any([student, teacher])
        finally:
            student.close()
            teacher.close()
            for s in states:
                self.student.release(s.key)
                self.teacher.release(s.key)
        return [s.trace for s in states]

    def decode_text(
        self, prompts: Sequence[str], config: RelayConfig | None = None
    ) -> list[RelayTrace]:
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        return self.decode(ids, config)

    # ------------------------------------------------------------------ internals
    def _new_state(
        self, i: int, prompt: list[int], cfg: RelayConfig, batch_id: int, t0: float
    ) -> _State:
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        base = cfg.seed * 1_000_003 + i
        st = _State(
            trace=RelayTrace(request_id=i, prompt_ids=prompt),
            student_gen=torch.Generator().manual_seed(2 * base),
            teacher_gen=torch.Generator().manual_seed(2 * base + 1),
            router=self._new_router(cfg, i),
            key=(batch_id, i),
            started=t0,
        )
        if cfg.mode == "teacher":
            self._teacher_writes(st, cfg)
        elif cfg.mode == "random_router":
            st.next_router_switch = self._next_router_switch(st, cfg)
        return st

    @staticmethod
    def _new_router(cfg: RelayConfig, request_id: int) -> random.Random:
        """The random router's RNG of one request (tests replace it to pick hand-offs)."""
        return random.Random(f"router/{cfg.seed}/{request_id}")

    @staticmethod
    def _draw_student_run(st: _State, cfg: RelayConfig, decided: int = 0) -> int:
        """Index of the next token the router gives to the teacher (geometric gaps).

        ``decided``: how many next tokens are the student's already. After a teacher run the
        first one is: the draw that ended the run was that token's, and drawing it again would
        make a teacher token follow a teacher token with 2p - p^2, not p (the realised share
        was p / (1 - p + p^2): 5.25 % for p = 0.05, 23.8 % for 0.2).
        """
        i = min(len(st.trace.token_ids) + decided, cfg.max_new_tokens)
        while i < cfg.max_new_tokens and st.router.random() >= cfg.router_p:
            i += 1
        return i

    @staticmethod
    def _teacher_tokens_left(st: _State, cfg: RelayConfig) -> int | None:
        """Teacher tokens the request may still get (None: no teacher-token budget)."""
        if cfg.max_teacher_tokens is None:
            return None
        return cfg.max_teacher_tokens - st.trace.n_teacher

    def _out_of_teacher_tokens(self, st: _State, cfg: RelayConfig) -> bool:
        left = self._teacher_tokens_left(st, cfg)
        return left is not None and left <= 0

    def _spent_budget(self, st: _State, cfg: RelayConfig) -> str | None:
        """The name of a teacher budget that allows no further hand-off, if one does."""
        if cfg.max_calls is not None and st.trace.calls >= cfg.max_calls:
            return "max_calls"
        if self._out_of_teacher_tokens(st, cfg):
            return "max_teacher_tokens"
        return None

    def _next_router_switch(self, st: _State, cfg: RelayConfig, decided: int = 0) -> int:
        """random_router: where the router next hands over; never once a budget is spent
        (the student writes the rest), else drawn as without budgets."""
        if self._spent_budget(st, cfg) is not None:
            return cfg.max_new_tokens
        return self._draw_student_run(st, cfg, decided)

    def _teacher_writes(self, st: _State, cfg: RelayConfig) -> None:
        """teacher mode: one call for the whole request, within the teacher budgets; a
        request whose budgets allow no call ends at once (module docstring)."""
        spent = self._spent_budget(st, cfg)
        if spent == "max_calls":
            self._finish(st, StopReason.MAX_CALLS)
            return
        if spent == "max_teacher_tokens":
            self._finish(st, StopReason.MAX_TEACHER_TOKENS)
            return
        room = self._room(st, cfg)
        left = self._teacher_tokens_left(st, cfg)
        st.phase, st.requested = "teacher", room
        st.grant = room if left is None else min(room, left)

    def _finish(self, st: _State, reason: str) -> None:
        self._mark_unterminated(st)  # however the request ends, an open command stays one
        st.phase = "done"
        st.trace.stop_reason = reason
        st.trace.seconds = time.perf_counter() - st.started

    def _room(self, st: _State, cfg: RelayConfig) -> int:
        return cfg.max_new_tokens - len(st.trace.token_ids)

    def _dispatch(self, st: _State, cfg: RelayConfig, student: Lane, teacher: Lane) -> None:
        """Send a request to the model whose turn it is (nothing once it is done)."""
        routed = st.phase == "student" and cfg.mode == "random_router"
        if routed and st.next_router_switch <= len(st.trace.token_ids):
            # the router gives the very next token to the teacher (budgets allowing)
            self._route_to_teacher(st, cfg)
        if st.phase == "done":
            return
        if st.phase == "student":
            limit = self._room(st, cfg)
            if cfg.mode == "random_router":
                limit = min(limit, st.next_router_switch - len(st.trace.token_ids))
            context = st.trace.prompt_ids + st.trace.token_ids
            bias = self._call_bias(st, cfg)
            lane, gen = student, st.student_gen
        else:
            context, limit, bias = self._teacher_view(st), st.grant, None
            lane, gen = teacher, st.teacher_gen
        st.request = GenRequest(
            key=st.key, context=context, max_new_tokens=limit, generator=gen, logit_bias=bias
        )
        st.submitted = time.perf_counter()
        lane.submit(st.request)

    def _call_bias(self, st: _State, cfg: RelayConfig) -> dict[int, float] | None:
        """The student request's logit bias: ``call_bias`` on the open tag outside a command
        while a call could still be granted, else none (module docstring, "Call bias")."""
        if not cfg.biased or self._open_index(st) is not None:
            return None
        if self._spent_budget(st, cfg) is not None:
            return None
        return {self.open_id: float(cfg.call_bias)}

    def _route_to_teacher(self, st: _State, cfg: RelayConfig) -> None:
        """random_router: the next token is the teacher's, and each further one with p; the
        run is clipped to the teacher tokens left. With a budget spent the router hands over
        no more: the student writes the rest."""
        if self._spent_budget(st, cfg) is not None:
            st.next_router_switch = cfg.max_new_tokens
            return
        room = self._room(st, cfg)
        run = 1
        while run < room and st.router.random() < cfg.router_p:
            run += 1
        left = self._teacher_tokens_left(st, cfg)
        st.phase, st.requested = "teacher", run
        st.grant = run if left is None else min(run, left)

    def _after_student(self, st: _State, res: GenResult, cfg: RelayConfig) -> None:
        tr = st.trace
        if not st.split:  # a call resumed after an open tag is the same turn
            tr.turns += 1
        st.split = False
        tr.student_prefill_tokens += res.prefill_tokens
        start = len(tr.token_ids)
        tr.token_ids.extend(res.tokens)
        tr.sources.extend([Source.STUDENT] * len(res.tokens))
        if res.finish == "error":
            self._finish(st, StopReason.TEACHER_ERROR)
            return
        if res.finish == "stop" and cfg.biased and res.tokens[-1] == self.open_id:
            # stopped at <call> (a stop token only under a call bias): the student goes on
            # writing the command's body, unbiased, in the next round
            if self._room(st, cfg) <= 0:
                self._finish(st, StopReason.MAX_NEW_TOKENS)
            else:
                st.split = True
            return
        if res.finish == "stop":
            self._handle_command(st, cfg, turn_start=start)
        elif res.finish == "eos":
            self._finish(st, StopReason.STUDENT_EOS)
            return
        room = self._room(st, cfg)
        if st.phase == "teacher":
            return
        if room <= 0:
            self._finish(st, StopReason.MAX_NEW_TOKENS)
        elif cfg.mode == "random_router":
            if len(tr.token_ids) >= st.next_router_switch:
                self._route_to_teacher(st, cfg)
        elif tr.turns >= cfg.max_turns:
            self._finish(st, StopReason.MAX_TURNS)

    def _open_index(self, st: _State) -> int | None:
        """Index of the first ``<call>`` of the student's current run (its tokens since the
        last token that is not the student's), which is not yet part of a command. A close tag
        ends the student's turn and is marked, so no open tag of the run has been closed; with
        several (nested) the command starts at the first."""
        tr = st.trace
        first = None
        for j in range(len(tr.token_ids) - 1, -1, -1):
            if tr.sources[j] != Source.STUDENT:
                break
            if tr.token_ids[j] == self.open_id:
                first = j
        return first

    def _mark_unterminated(self, st: _State, detail: str = f"{CALL_OPEN} never closed") -> None:
        j = self._open_index(st)
        if j is None:
            return
        tr = st.trace
        for k in range(j, len(tr.token_ids)):
            tr.sources[k] = Source.COMMAND
        tr.events.append(CallEvent(len(tr.token_ids) - 1, "unterminated", detail))

    def _piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        return text

    def _teacher_view(self, st: _State) -> list[int]:
        """The context of a hand-off: an open command is abandoned first (module docstring)."""
        self._mark_unterminated(
            st, f"{CALL_OPEN} not closed when the pen passed to the teacher: abandoned"
        )
        return st.trace.teacher_view_ids((self.open_id, self.close_id), self._piece)

    def _handle_command(self, st: _State, cfg: RelayConfig, turn_start: int) -> None:
        tr = st.trace
        close = len(tr.token_ids) - 1
        tr.sources[close] = Source.COMMAND
        # The open tag must be in the student's own run right before the close tag.
        body_start = close
        while body_start > 0 and tr.sources[body_start - 1] == Source.STUDENT:
            body_start -= 1
        run = tr.token_ids[body_start:close]
        opens = [body_start + k for k, t in enumerate(run) if t == self.open_id]
        if not opens:
            tr.events.append(CallEvent(close, "malformed", f"{CALL_CLOSE} without {CALL_OPEN}"))
            return
        open_at = opens[-1]
        for k in range(opens[0], close):
            tr.sources[k] = Source.COMMAND
        body = self.tokenizer.decode(tr.token_ids[open_at + 1 : close])
        if len(opens) > 1:
            tr.events.append(CallEvent(close, "malformed", "nested call command"))
            return
        try:
            n = parse_call_body(body)
        except MalformedCall as err:
            tr.events.append(CallEvent(close, "malformed", str(err)))
            return
        if n == 0:
            return  # "no call": the student goes on
        if cfg.mode in ("student", "random_router"):
            tr.events.append(
                CallEvent(close, "blocked", f"call for {n} blocked in {cfg.mode} mode")
            )
            return
        requested = cfg.fixed_n if cfg.mode == "fixed_help" else n
        if cfg.max_calls is not None and tr.calls >= cfg.max_calls:
            tr.events.append(CallEvent(close, "budget", f"call budget {cfg.max_calls} spent"))
            return
        limits = {"max_call_tokens": cfg.max_call_tokens, "max_new_tokens": self._room(st, cfg)}
        if cfg.max_teacher_tokens is not None:
            limits["max_teacher_tokens"] = cfg.max_teacher_tokens - tr.n_teacher
        bound, limit = min(limits.items(), key=lambda kv: kv[1])
        if limit <= 0:
            tr.events.append(CallEvent(close, "budget", f"{bound} leaves no room for {n} tokens"))
            return
        if requested > limit:
            tr.events.append(CallEvent(close, "clipped", f"{requested} -> {limit} by {bound}"))
        st.phase, st.requested, st.grant = "teacher", requested, min(requested, limit)

    def _after_teacher(self, st: _State, res: GenResult, cfg: RelayConfig) -> None:
        tr, req = st.trace, st.request
        assert req is not None
        start = len(tr.token_ids)
        tr.token_ids.extend(res.tokens)
        tr.sources.extend([Source.TEACHER] * len(res.tokens))
        tr.handoffs.append(
            HandOff(
                start=start,
                requested=st.requested,
                granted=st.grant,
                delivered=len(res.tokens),
                prefill_tokens=res.prefill_tokens,
                context_tokens=len(req.context),
                seconds=time.perf_counter() - st.submitted,
            )
        )
        failed = res.finish == "error"
        if failed:
            tr.events.append(CallEvent(start, "teacher_error", res.error or "teacher failed"))
        if res.finish == "eos":
            self._finish(st, StopReason.TEACHER_EOS)
        elif self._room(st, cfg) <= 0:
            self._finish(st, StopReason.MAX_NEW_TOKENS)
        elif failed and cfg.mode == "teacher":  # nobody else may write: end it unanswered
            self._finish(st, StopReason.TEACHER_ERROR)
        elif cfg.mode == "teacher" and self._out_of_teacher_tokens(st, cfg):
            self._finish(st, StopReason.MAX_TEACHER_TOKENS)  # nobody else may write
        else:
            st.phase = "student"
            if cfg.mode == "random_router":
                # the token after a whole teacher run is the student's: the draw that ended
                # the run was that token's (a run the teacher cut short decided nothing about
                # the next token: it is drawn afresh)
                whole = len(res.tokens) == st.requested
                st.next_router_switch = self._next_router_switch(st, cfg, decided=int(whole))
                if failed:  # the student writes a token before the router may retry
                    st.next_router_switch = max(st.next_router_switch, start + 1)
