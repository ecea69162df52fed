"""Errors a user can fix, and how the command lines report them.

Every command line of the project (``relaypipe ...``, ``python -m flows.stages <stage>``, which
is what dvc.yaml runs, ``python -m relaypipe.stages.<stage>`` and ``python -m flows ...``)
reports an *input error* as a few lines on stderr, without a traceback::

    python -m flows.stages prepare: error: params.yaml:prepare: unknown key(s) n_trian; ...
    (bad input, not a bug: fix it and re-run; RELAYPIPE_TRACEBACK=1 or -v shows the traceback)

and exits with :data:`EXIT_INPUT` (2, as argparse does for a bad argument). Anything else is
treated as a bug: the full traceback, exit status 1 (Python's own).

The full traceback of an input error too: ``-v`` / ``--verbose`` on any of these commands, or
``RELAYPIPE_TRACEBACK=1`` in the environment (the way for ``dvc repro``, whose stage commands
are fixed; ``python -m flows repro -v`` sets it for the stages as well).

What counts as an input error (:func:`is_input_error`):

* :class:`InputError` and its subclasses (``relaypipe.config.ConfigError``,
  ``relaypipe.io.ParamsError`` and ``SchemaViolation``, ``relaypipe.relay.grammar.
  MalformedCall``, ``relaypipe.stages.inputs.StageInputError``); new code raises these (a
  ``ValueError`` subclass, so ``except ValueError`` keeps working);
* the project's other error classes, by name (:data:`KNOWN_INPUT_ERRORS`): a teacher server
  that fails (``relaypipe.relay.http_backend.TeacherUnavailable``), a download that fails
  (``relaypipe.importing.FetchError``, ``relaypipe.tasks.dataset.DatasetUnavailableError``),
  a refused degenerate run (``relaypipe.checks.DegenerateRunError``);
* a YAML file that does not parse (``yaml.YAMLError``);
* ``OSError``: a missing input file or model directory, a permission, a full disk;
* a ``ValueError`` raised by a stage module itself (``relaypipe/stages/*.py``): their own
  checks of inputs, until they raise :class:`InputError`.

This module imports only the standard library, so a command's ``--help`` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

TRACEBACK_ENV = "RELAYPIPE_TRACEBACK"
EXIT_INPUT = 2  # bad input (argparse uses 2 for a bad argument as well)
EXIT_BUG = 1  # an unexpected error, with its traceback (Python's own status for one)


class InputError(ValueError):
    """Bad input the user can fix (a params file, an input file, an argument value).

    The message says what is wrong, where (file, key, column or option) and, when it is not
    obvious, how to fix it. Command lines print it without a traceback and exit with
    :data:`EXIT_INPUT`.
    """


class UsageExit(SystemExit):
    """``SystemExit(EXIT_INPUT)`` for a message already printed; ``str()`` is that message.

    What :func:`run_main` turns a command's own ``raise SystemExit("error: ...")`` into: the
    same exit status as argparse's for a bad argument, and in-process callers (tests) still
    catch a SystemExit whose text is the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_INPUT)
        self.message = message

    def __str__(self) -> str:
        return self.message


# The project's error classes that predate InputError, as (module, class name). Looked up only
# in modules already imported: an exception of a class whose module was never imported cannot
# exist, and importing relaypipe.io (pandas) just to compare would slow every command down.
KNOWN_INPUT_ERRORS: tuple[tuple[str, str], ...] = (
    ("relaypipe.config", "ConfigError"),
    ("relaypipe.relay.http_backend", "TeacherUnavailable"),
    ("relaypipe.importing", "FetchError"),
    ("relaypipe.tasks.dataset", "DatasetUnavailableError"),
    ("relaypipe.checks", "DegenerateRunError"),
    ("yaml", "YAMLError"),
)

_STAGES_DIR = Path(__file__).resolve().parent / "stages"


def _known_classes() -> list[type]:
    out = []
    for module_name, class_name in KNOWN_INPUT_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return out


def _raised_in_a_stage(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in relaypipe/stages/."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().parent == _STAGES_DIR
    except OSError:
        return False


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input (reported briefly) rather than a bug (see the module doc)."""
    if isinstance(exc, InputError | OSError):
        return True
    if any(isinstance(exc, cls) for cls in _known_classes()):
        return True
    return type(exc) is ValueError and _raised_in_a_stage(exc)


def traceback_wanted(verbose: bool = False) -> bool:
    """``verbose`` (a command's ``-v``) or ``RELAYPIPE_TRACEBACK`` set to anything but 0/false."""
    flag = os.environ.get(TRACEBACK_ENV, "").strip().lower()
    return verbose or flag not in ("", "0", "false", "no", "off")


def want_tracebacks() -> None:
    """What ``-v`` does: :func:`traceback_wanted` from here on, in child processes too."""
    os.environ[TRACEBACK_ENV] = "1"


def describe(exc: BaseException) -> str:
    """The message of an input error, as the user should read it."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None and getattr(exc, "problem", None):  # yaml's MarkedYAMLError
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"
        context = getattr(exc, "context", None)
        context_mark = getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            context += f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
        tail = f" ({context})" if context else ""
        return f"{where}: not valid YAML: {exc.problem}{tail}"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc).strip()
    return text or type(exc).__name__


def report(
    exc: BaseException, prog: str, *, verbose: bool = False, stream: IO[str] | None = None
) -> None:
    """Print ``exc`` as an input error: the message, then one line on how to see more (left
    out when the traceback is shown anyway)."""
    out = sys.stderr if stream is None else stream
    print(f"{prog}: error: {describe(exc)}", file=out)
    if not traceback_wanted(verbose):
        print(
            f"(bad input, not a bug: fix it and re-run; {TRACEBACK_ENV}=1 or -v shows the "
            "traceback)",
            file=out,
        )
    out.flush()


def run_main(fn: Callable[[], Any], *, prog: str, verbose: bool = False) -> int:
    """Run a command's body: its return value (an exit status), or :data:`EXIT_INPUT` after
    reporting an input error briefly (with its traceback when :func:`traceback_wanted`).

    A ``SystemExit("error: ...")`` of the body (a command's own check of its options) is
    printed the same way and raised again as :class:`UsageExit` (status 2, not Python's 1).
    Other exceptions propagate, traceback and all.
    """
    try:
        status = fn()
    except SystemExit as exc:
        if not isinstance(exc.code, str) or isinstance(exc, UsageExit):
            raise
        message = exc.code.removeprefix("error:").strip()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise UsageExit(exc.code) from None
    except Exception as exc:
        if not is_input_error(exc):
            raise
        if traceback_wanted(verbose):
            traceback.print_exc()
        report(exc, prog, verbose=verbose)
        return EXIT_INPUT
    return 0 if status is None else status


def install_excepthook(prog: str) -> None:
    """Report an input error that ends the program briefly, and exit with :data:`EXIT_INPUT`.

    For entry points whose top level is not ours to wrap (``python -m relaypipe.stages.X``
    runs the stage module's own ``main()``); :func:`run_main` is the way where it is.
    """
    previous = sys.excepthook

    def hook(tp: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not isinstance(exc, Exception) or not is_input_error(exc):
            previous(tp, exc, tb)
            return
        if traceback_wanted():
            previous(tp, exc, tb)
        report(exc, prog)
        _exit(EXIT_INPUT)

    sys.excepthook = hook


def _exit(status: int) -> NoReturn:
    """Exit with ``status`` from inside sys.excepthook, where SystemExit is not honoured (an
    uncaught exception always exits 1): run the atexit handlers (logging's flush among them)
    and flush the standard streams, as a normal exit would, then leave."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
