"""Train a causal LM from scratch on worked solutions (the bootstrap of the micro pair).

Plain PyTorch on purpose: the models are tiny, the data is already tokenised, and a Trainer's
machinery would cost more than the training itself on two CPU cores. The loss covers only the
completion (solution + EOS), never the prompt, exactly as the later SFT stage does.

``command_context`` makes a from-scratch student *read past* call commands without learning to
write them: that fraction of the examples gets 1-3 ``<call>n</call>`` inserted at random
positions of the solution, and the command tokens are left out of the loss. A pretrained LLM
shrugs off an unfamiliar tag in its context; a 90k-parameter model trained only on clean
solutions does not (measured: warm-up SFT on the student's own right answers with commands
halved its teacher-free accuracy, 0.69 -> 0.37), because every command shifts the positions it
copies operands by. With ``command_context`` 0.5 the same warm-up leaves it unchanged.

``withhold`` gives a model a *knowledge gap*: training problems whose question or worked solution
matches
the regular expression are left out, so the model never sees those steps. A student trained to
convergence this way copies and reads past commands reliably, yet cannot do the withheld steps:
its mistakes sit on known tokens (a step that adds 7, say) that the teacher gets right, which is
the situation RelayLLM is for, and one in which where the student calls can be checked.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relaypipe.relay.grammar import format_call
from relaypipe.tasks.base import Problem, format_prompt

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    command_context: float = 0.0  # share of examples with loss-masked commands inserted
    command_n_values: tuple[int, ...] = (1, 2, 4)  # their n
    withhold: str | None = None  # regex: leave out problems whose question or solution matches

    def __post_init__(self) -> None:
        if self.withhold is not None:
            try:
                re.compile(self.withhold)
            except re.error as exc:
                raise ValueError(f"withhold is not a regular expression: {exc}") from None
        if not 0.0 <= self.command_context <= 1.0:
            raise ValueError(f"command_context must be in [0, 1], got {self.command_context}")
        if not self.command_n_values or min(self.command_n_values) < 1:
            raise ValueError("command_n_values must be non-empty positive integers")


# One training example: token ids, prompt length, and completion positions kept out of the loss.
Example = tuple[list[int], int, frozenset[int]]


def encode_examples(
    problems: list[Problem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + EOS, prompt length) per problem."""
    out = []
    for p in problems:
        text = format_prompt(
            p.question,
            tokenizer,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        completion = tokenizer(p.solution, add_special_tokens=False).input_ids
        out.append((prompt + completion + [tokenizer.eos_token_id], len(prompt)))
    return out


def withhold_problems(problems: list[Problem], pattern: str | None) -> list[Problem]:
    """The problems whose question and worked solution both do not match ``pattern`` (all of
    them if None): ``\\+[78]=`` drops every step adding 7 or 8, ``\\b[v-z]\\b`` every question
    with one of the code letters v-z."""
    if pattern is None:
        return problems
    regex = re.compile(pattern)
    kept = [p for p in problems if not (regex.search(p.question) or regex.search(p.solution))]
    if not kept:
        raise ValueError(f"withhold {pattern!r} leaves no training problem")
    log.info("withhold %r: training on %d of %d problems", pattern, len(kept), len(problems))
    return kept


def add_context_commands(
    examples: list[tuple[list[int], int]],
    tokenizer: PreTrainedTokenizerBase,
    fraction: float,
    n_values: tuple[int, ...],
    rng: random.Random,
) -> list[Example]:
    """Insert 1-3 loss-masked ``<call>n</call>`` into ``fraction`` of the examples' solutions
    (never before the first solution token, never after EOS); see the module doc."""
    out: list[Example] = []
    for ids, prompt_len in examples:
        if rng.random() >= fraction:
            out.append((ids, prompt_len, frozenset()))
            continue
        body, eos = ids[prompt_len:-1], ids[-1:]
        cuts = sorted(rng.randint(1, max(1, len(body) - 1)) for _ in range(rng.randint(1, 3)))
        pieces, masked, prev = list(ids[:prompt_len]), set(), 0
        for cut in cuts:
            pieces += body[prev:cut]
            command = tokenizer(format_call(rng.choice(n_values)), add_special_tokens=False)
            masked.update(range(len(pieces), len(pieces) + len(command.input_ids)))
            pieces += command.input_ids
            prev = cut
        out.append((pieces + body[prev:] + eos, prompt_len, frozenset(masked)))
    return out


def collate(
    batch: list[tuple[list[int], int]] | list[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (prompt, padding and any masked
    positions ignored)."""
    width = max(len(example[0]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
    for i, (ids, prompt_len, *rest) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        for j in rest[0] if rest else ():
            labels[i, j] = IGNORE
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    spec: TrainSpec,
    desc: str = "train",
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float | int]:
    """Train ``model`` in place; returns the final smoothed loss, the wall time and the number
    of problems trained on.

    Also fine-tunes a pretrained model on the task (the ``pretrained`` bootstrap), with
    ``chat_template`` (and ``chat_template_kwargs``) framing the prompts as every later stage
    will.
    """
    problems = withhold_problems(problems, spec.withhold)
    examples = add_context_commands(
        encode_examples(
            problems,
            tokenizer,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        ),
        tokenizer,
        spec.command_context,
        spec.command_n_values,
        random.Random(spec.seed),
    )
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98)
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    device = next(model.parameters()).device
    smoothed = float("nan")
    start = time.perf_counter()
    bar = tqdm(range(spec.steps), desc=desc, mininterval=2.0)
    for step in bar:
        idx = torch.randint(len(examples), (spec.batch_size,), generator=gen).tolist()
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        input_ids, mask, labels = (x.to(device) for x in batch)  # a fine-tune may run on GPU
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        if step % 20 == 0:
            bar.set_postfix(loss=f"{smoothed:.4f}")
    model.eval()
    seconds = time.perf_counter() - start
    log.info("%s: %d steps, loss %.4f, %.1f s", desc, spec.steps, smoothed, seconds)
    return {"loss": smoothed, "seconds": seconds, "problems": len(problems)}
