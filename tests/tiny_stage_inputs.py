"""Inputs for running the training stages on tiny models: problems, a student and a teacher
saved like bootstrap saves them, a warm-up table, a kept-problems table and bootstrap metrics.

Everything is real and small: the character tokenizer, Llama micro models with random weights,
tables written through their pandera schemas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from relaypipe.io import read_table, write_table
from relaypipe.micro.models import ModelSize, build_model
from relaypipe.micro.tokenizer import build_char_tokenizer
from relaypipe.schemas import FilteredProblemSchema, ProblemSchema, SFTExampleSchema
from relaypipe.stages import prepare
from relaypipe.tasks.base import format_prompt

# Qwen3's handling of enable_thinking, cut down to one user turn: with enable_thinking=false the
# generation prompt carries an empty think block, which tells Qwen3 to answer without thinking.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
THINK_OFF = "<think>\n\n</think>\n\n"


def make_inputs(
    root: Path,
    *,
    chat_template: str | None = None,
    max_positions: int = 512,
    long_completion: int = 0,
) -> dict[str, str]:
    """Write every input of bootstrap (pretrained), filter, warmup_data, sft, grpo, evaluate.

    ``chat_template``: set on the saved tokenizer. ``long_completion``: one warm-up row gets a
    completion of that many characters (= tokens with the character tokenizer). Returns the
    paths, keyed like the stages' params.
    """
    prepare.run(
        prepare.PrepareParams(
            terms=3,
            n_train=24,
            n_eval=4,
            benchmarks=[prepare.BenchmarkSpec(name="arith-d1t3", terms=3, n=2)],
            out_dir=str(root / "problems"),
        )
    )
    tok = build_char_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    models = root / "models"
    for name, size, seed in (
        ("student", ModelSize(32, 1, 2, 64, max_positions), 1),
        ("teacher", ModelSize(48, 2, 4, 96, max_positions), 2),
    ):
        build_model(size, tok, seed=seed).save_pretrained(models / name)
        tok.save_pretrained(models / name)
    (models / "bootstrap.json").write_text(
        json.dumps({"student_accuracy": 0.0, "teacher_accuracy": 0.5})
    )

    train = read_table(root / "problems" / "train.parquet", ProblemSchema)
    kept = train.assign(teacher_pass_rate=0.5)
    write_table(kept, root / "filter" / "kept.parquet", FilteredProblemSchema)

    kwargs = {"enable_thinking": False} if chat_template else None
    rows = []
    for i, p in enumerate(train.itertuples()):
        solution = p.solution if i or not long_completion else _long(p.solution, long_completion)
        prompt = format_prompt(
            p.question, tok, chat_template=bool(chat_template), chat_template_kwargs=kwargs
        )
        rows.append(
            {
                "problem_id": p.problem_id,
                "prompt": prompt,
                "completion": solution.replace("\n", "<call>2</call>\n", 1),
                "n_commands": 1,
                "policy": "random",
            }
        )
    write_table(pd.DataFrame(rows), root / "warmup" / "sft.parquet", SFTExampleSchema)
    return {
        "problems": str(root / "problems"),
        "student": str(models / "student"),
        "teacher": str(models / "teacher"),
        "bootstrap_metrics": str(models / "bootstrap.json"),
        "kept": str(root / "filter" / "kept.parquet"),
        "train": str(root / "problems" / "train.parquet"),
        "eval": str(root / "problems" / "eval.parquet"),
        "benchmarks": str(root / "problems" / "benchmarks"),
        "warmup": str(root / "warmup" / "sft.parquet"),
    }


def _long(solution: str, chars: int) -> str:
    """A worked solution padded to about ``chars`` characters, its answer line still last."""
    body, answer = solution.rsplit("\n", 1)
    filler = "\n".join(["0+0=0"] * (chars // 6))
    return f"{filler}\n{body}\n{answer}"
