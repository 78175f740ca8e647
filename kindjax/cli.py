"""One style for every command-line tool, ``python -m kindjax.<name>`` (tests/test_cli.py checks it
for every module that runs as a program):

- **Named flags only** (absl): no positional arguments; a stray argument is an error.
- **Outputs**: ``--workdir DIR`` is the folder a command writes a *run* into (``kindjax.main``,
  ``kindjax.sweep``; ``kindjax.tools.convert`` writes a checkpoint workdir). ``--out PATH`` is the
  file or folder a command writes an *artifact* to (``tools.encode``'s latents, ``tools.slice``'s
  checkpoint, ``papers.kind.analyze``'s tables, ``evaluation.reference``'s batch,
  ``evaluation.inception``'s weights; ``kindjax.evaluation`` writes into the run it evaluates unless
  ``--out`` names another folder). No command reads ``--workdir``.
- **Inputs** by flags that say what they are: ``--run RUN``, a training workdir the command reads
  (a second run: ``--<role>_run``, e.g. ``--dense_run``); ``--src``, a file or folder to convert;
  ``--vae``, a VAE directory; ``--config FILE[:ARGS]`` with ``--config.KEY=VALUE`` overrides, always
  defined by :func:`define_config` (locked: a key the config does not have is an error).
- **One name, one type** in every command: ``--classes`` is a list of class ids
  (:func:`define_classes`, ``--classes 0,3,7``); a count is ``--num_<things>`` (``--num_classes``,
  ``--num_samples``); a list is a comma-separated ``DEFINE_list`` with a plural name.
- **Errors** are one line ``kindjax.<name>: message`` naming the flag or input and the fix, exit
  status 1 (Ctrl-C outside the training loop: 130), without the tracebacks background threads
  would add (:class:`HeldErrors`); the traceback only with ``--debug`` or ``KINDJAX_DEBUG=1``. ``--help`` lists every flag of the command and exits 0.

A command::

    def main(argv: list[str]) -> None:
        del argv
        work(flags.FLAGS.config, flags.FLAGS.run, flags.FLAGS.out)

    if __name__ == "__main__":   # flags are defined only when the module runs as a program
        cli.define_config("Config file (configs/*.py).")
        flags.DEFINE_string("run", None, "Training workdir to read.")
        flags.DEFINE_string("out", None, "File to write.")
        flags.mark_flags_as_required(["config", "run", "out"])
        cli.run(main)
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, NoReturn

from absl import flags

# Flags that this module's helpers define (--debug, --config, --classes) belong to the command
# that calls them: its --help lists them.
flags.disclaim_key_flags()

#: Errors with a message that names the problem and the fix: printed as the message alone.
#: Anything else is a bug: printed as its type and message, with a pointer to ``--debug``.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)
#: The environment variable that, set to 1, makes every command print tracebacks (as ``--debug``).
DEBUG_ENV = "KINDJAX_DEBUG"


class ClassIdsParser(flags.ListParser):
    """``0,3,7`` → ``[0, 3, 7]``: the one type of ``--classes``."""

    def __init__(self) -> None:
        super().__init__()
        self.syntactic_help = "a comma separated list of class ids"

    def parse(self, argument: str | list) -> list[int]:
        ids = super().parse(argument)
        try:
            return [int(c) for c in ids]
        except ValueError:
            raise ValueError(f"give class ids as integers, e.g. 0,3,7 (got {','.join(map(str, ids))})") from None

    def flag_type(self) -> str:
        return "list of class ids"


def define_classes(help: str, default: list[int] | None = None,
                   flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """Defines ``--classes``, a comma-separated list of class ids (ints)."""
    return flags.DEFINE(ClassIdsParser(), "classes", default, help, flag_values,
                        serializer=flags.CsvListSerializer(","))


def define_config(help: str, flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """Defines ``--config FILE[:ARGS]`` (ml_collections), locked: an override of a key the config does
    not have, or code that adds one, is an error."""
    from ml_collections import config_flags

    return config_flags.DEFINE_config_file("config", None, help, flag_values, lock_config=True)


def program() -> str:
    """``kindjax.<name>`` of the running command (``python -m kindjax.<name>``): the ``__main__``
    module's import name, without ``.__main__`` for a package."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = spec.name if spec is not None else os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return name.removesuffix(".__main__")


def debugging() -> bool:
    """True when tracebacks were asked for (``--debug`` on the command line or ``KINDJAX_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in sys.argv[1:]


def run(main: Callable[[list[str]], object]) -> None:
    """``absl.app.run(main)`` with absl logging at WARNING (Orbax logs every file at INFO), a
    ``--debug`` flag, ``--help`` listing every flag of the command, and every error as one line
    (see the module docstring)."""
    from absl import app, logging

    name = program()
    flags.DEFINE_boolean("debug", False, f"Print tracebacks (also: {DEBUG_ENV}=1).")
    for module, defined in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("kindjax."):   # flags a helper module defined for this command (tools.bench's suites)
            for flag in defined:
                flags.declare_key_flag(flag.name)

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        held = None if debugging() else HeldErrors()
        try:
            main(argv)
        except KeyboardInterrupt:
            if debugging():
                raise
            _exit(name, "interrupted (Ctrl-C)", status=130)
        except Exception as e:  # noqa: BLE001 — the one place that turns errors into lines
            if debugging():
                raise
            if isinstance(e, USER_ERRORS):
                _exit(name, _one_line(str(e)) or type(e).__name__)
            _exit(name, f"{type(e).__name__}: {_one_line(str(e))} (a bug? rerun with --debug or "
                        f"{DEBUG_ENV}=1 for the traceback)")
        if held is not None:
            held.release()

    app.run(guarded, flags_parser=lambda argv: parse_flags(argv, name))


class HeldErrors:
    """Holds back, while a command runs, the errors its background threads report on their own: Orbax's
    error logs (each with a traceback: a failed asynchronous write reports itself in four threads)
    and exceptions Python cannot raise anywhere (the write's callbacks after its event loop closed).
    A command that then fails says what failed in its one line, and they are dropped; one that
    succeeds prints them at the end (:meth:`release`), so nothing is lost.  ``--debug`` shows them
    as they come."""

    def __init__(self):
        import logging as py_logging

        self.texts: list[str] = []
        self._logger = py_logging.getLogger("absl")
        self._formatter = py_logging.Formatter()
        self._logger.addFilter(self._hold_log)
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._hold_unraisable

    def _hold_log(self, record) -> bool:
        if record.levelno >= 40 and "orbax" in record.pathname:   # ERROR and above, from Orbax
            self.texts.append(self._formatter.format(record))
            return False
        return True

    def _hold_unraisable(self, unraisable) -> None:
        self.texts.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value}")

    def release(self) -> None:
        """Stops holding and prints what was held (to stderr)."""
        self._logger.removeFilter(self._hold_log)
        sys.unraisablehook = self._unraisable
        for text in self.texts:
            print(text, file=sys.stderr)


def parse_flags(argv: list[str], name: str) -> list[str]:
    """Parses ``argv`` into absl's ``FLAGS`` and returns ``[program]``; exits with ``name: message``
    on a flag error, a positional argument, an unknown config key (a locked config raises inside
    absl's parser) or a config file that does not exist (ml_collections would report that only at
    the config's first use, with a traceback); exits 0 after ``--help`` (absl exits 1)."""
    from ml_collections import config_flags

    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:   # absl's --help, --helpfull, --helpxml: the help was printed
        sys.exit(0 if e.code == 1 else e.code)
    except flags.Error as e:
        _exit(name, f"{_one_line(str(e))} (see --help)")
    except (AttributeError, KeyError) as e:
        if debugging():
            raise
        _exit(name, unknown_key_message(argv, e))
    except OSError as e:   # a config file that does not load, found while applying an override
        if debugging():
            raise
        missing = [a.rpartition("=")[2] for a in argv[1:] if ".py" in a and not os.path.isfile(
            a.rpartition("=")[2].split(":", 1)[0])]
        _exit(name, f"--config: no config file {missing[0]!r}" if missing else _one_line(str(e)))
    if len(rest) > 1:
        _exit(name, f"unexpected argument {rest[1]!r}: every input is a named flag (see --help)")
    for flag_name in flags.FLAGS:
        flag = flags.FLAGS[flag_name]
        if not flag.present:
            continue
        try:
            path = config_flags.get_config_filename(flag).split(":", 1)[0]
        except TypeError:   # not a config flag
            continue
        if not os.path.isfile(path):
            _exit(name, f"--{flag_name}: no config file {path!r}")
    return rest


def _key_error(error: BaseException) -> tuple[str, str | None]:
    """The key an ml_collections ``KeyError``/``AttributeError`` names (its message is the repr of a
    ``KeyError``, perhaps nested in another error) and the near key it suggests, if any."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    named = re.search(r"""["']([^"'\s]+)["']""", text)
    near = re.search(r'Did you mean "([^"]+)"', text)
    return (named[1] if named else text.strip("'\""), near[1] if near else None)


def unknown_key_message(argv: list[str], error: BaseException) -> str:
    """The override in ``argv`` that names a key the config does not have, and the key it was
    probably meant to be, or the keys that exist there (from :func:`kindjax.config.base_config`)."""
    from kindjax.config import base_config

    missing, near = _key_error(error)
    for arg in argv[1:]:
        flag, _, _ = arg.lstrip("-").partition("=")
        head, _, key = flag.partition(".")
        if not key or missing not in key.split("."):
            continue
        where = key.rpartition(".")[0] or head
        if near:
            meant = ".".join(near if part == missing else part for part in flag.split("."))
            return f"--{flag}: no config key {key!r}; did you mean --{meant}? (the schema is in kindjax/config.py)"
        parent = base_config()
        for part in key.split(".")[:-1]:
            parent = parent.get(part) if hasattr(parent, "get") else None
        known = sorted(parent.keys()) if hasattr(parent, "keys") else []
        return (f"--{flag}: no config key {key!r}; {where} has {known} (the schema and its defaults are "
                f"in kindjax/config.py)")
    return f"unknown config key {missing!r} (the schema and its defaults are in kindjax/config.py)"


def _one_line(message: str) -> str:
    """The first and last non-empty lines of ``message`` (for a config file that raised, the
    flag and the exception), joined."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[1:][-1:])


def _exit(name: str, message: str, status: int = 1) -> NoReturn:
    """Prints ``name: message`` and ends the process at once: interpreter shutdown would print the
    tracebacks of Orbax's pending writes (``ImportError: sys.meta_path is None``)."""
    print(f"{name}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)
