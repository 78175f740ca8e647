"""One style for every command-line tool: absl flags (ml_collections config files where a
command takes a config), and errors printed as one line.

    if __name__ == "__main__":
        flags.DEFINE_string(...)   # flags are defined only when the module runs as a program
        cli.run(main, "encode")

Every failure ends as one line ``kindjax.<name>: message`` with exit status 1 (Ctrl-C outside
the training loop: 130).  The traceback is printed only with ``--debug`` or ``KINDJAX_DEBUG=1``.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

#: Errors with a message that names the problem and the fix: printed as the message alone.
#: Anything else is a bug: printed as its type and message, with a pointer to ``--debug``.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)
#: The environment variable that, set to 1, makes every command print tracebacks (as ``--debug``).
DEBUG_ENV = "KINDJAX_DEBUG"


def debugging() -> bool:
    """True when tracebacks were asked for (``--debug`` on the command line or ``KINDJAX_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in sys.argv[1:]


def run(main: Callable[[list[str]], object], name: str) -> None:
    """``absl.app.run(main)`` with absl logging at WARNING (Orbax logs every file at INFO), a
    ``--debug`` flag, and every error as one line (see the module docstring)."""
    from absl import app, flags, logging

    flags.DEFINE_boolean("debug", False, f"Print tracebacks (also: {DEBUG_ENV}=1).")

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
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

    app.run(guarded, flags_parser=lambda argv: parse_flags(argv, name))


def parse_flags(argv: list[str], name: str) -> list[str]:
    """Parses ``argv`` into absl's ``FLAGS`` and returns the remaining arguments; exits with
    ``kindjax.<name>: message`` on a flag error, an unknown config key (a locked config raises
    inside absl's parser) or a config file that does not exist (ml_collections would report that
    only at the config's first use, with a traceback)."""
    from absl import flags
    from ml_collections import config_flags

    try:
        rest = flags.FLAGS(argv)
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


def unknown_key_message(argv: list[str], error: BaseException) -> str:
    """The override in ``argv`` that names a key the config does not have, and the keys that
    exist there (from :func:`kindjax.config.base_config`)."""
    from kindjax.config import base_config

    missing = str(error).strip("'\"")
    for arg in argv[1:]:
        flag, _, _ = arg.lstrip("-").partition("=")
        head, _, key = flag.partition(".")
        if not key or missing not in key.split("."):
            continue
        parent = base_config()
        for part in key.split(".")[:-1]:
            parent = parent.get(part) if hasattr(parent, "get") else None
        known = sorted(parent.keys()) if hasattr(parent, "keys") else []
        where = key.rpartition(".")[0] or head
        return (f"--{flag}: no config key {key!r}; {where} has {known} (the schema and its defaults are "
                f"in kindjax/config.py)")
    return f"unknown config key {missing!r} (the schema and its defaults are in kindjax/config.py)"


def class_ids(ids: list[str] | None) -> list[int] | None:
    """A ``--classes`` list flag as ints (None when it was not given)."""
    if ids is None:
        return None
    try:
        return [int(c) for c in ids if c.strip()]
    except ValueError:
        raise ValueError(f"--classes={','.join(ids)}: give class ids as 0,3,7") from None


def _one_line(message: str) -> str:
    """The first and last non-empty lines of ``message`` (for a config file that raised, the
    flag and the exception), joined."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[1:][-1:])


def _exit(name: str, message: str, status: int = 1) -> NoReturn:
    """Prints the line and ends the process at once: interpreter shutdown would print the
    tracebacks of Orbax's pending writes (``ImportError: sys.meta_path is None``)."""
    print(f"kindjax.{name}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)
