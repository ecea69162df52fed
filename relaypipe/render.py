"""Show a relay trace to a person: teacher spans and commands marked, plus a summary line."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from relaypipe.relay.trace import RelayTrace, Source

# Plain-text markers work in logs and pipes; colours are added only for terminals.
MARKS = {Source.TEACHER: ("⟦", "⟧"), Source.COMMAND: ("", "")}
COLOURS = {Source.TEACHER: "\033[1;36m", Source.COMMAND: "\033[2;33m"}
RESET = "\033[0m"


def render_trace(
    trace: RelayTrace, tokenizer: PreTrainedTokenizerBase, colour: bool = False
) -> str:
    """The generated text with each teacher span wrapped in ⟦…⟧ (and coloured on a tty)."""
    pieces: list[str] = []
    i, ids, src = 0, trace.token_ids, trace.sources
    while i < len(ids):
        j = i
        while j < len(ids) and src[j] == src[i]:
            j += 1
        kind = Source(src[i])
        text = tokenizer.decode(ids[i:j], skip_special_tokens=kind != Source.COMMAND)
        left, right = MARKS.get(kind, ("", ""))
        if colour and kind in COLOURS:
            text = f"{COLOURS[kind]}{text}{RESET}"
        pieces.append(f"{left}{text}{right}")
        i = j
    return "".join(pieces)


def summary_line(trace: RelayTrace) -> str:
    events = f", events: {', '.join(e.kind for e in trace.events)}" if trace.events else ""
    return (
        f"[student {trace.n_student} tok ({trace.n_command} in commands), teacher "
        f"{trace.n_teacher} tok, call ratio {trace.call_ratio:.1%}, {trace.calls} call(s), "
        f"stop: {trace.stop_reason}{events}]"
    )
