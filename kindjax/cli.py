"""One style for every command-line tool: absl flags (ml_collections config files where a
command takes a config), and errors a user can fix printed as one line.

    if __name__ == "__main__":
        flags.DEFINE_string(...)   # flags are defined only when the module runs as a program
        cli.run(main, "encode")
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

#: Errors with a message that names the problem and the fix; anything else is a bug and keeps
#: its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def run(main: Callable[[list[str]], object], name: str) -> None:
    """``absl.app.run(main)`` with absl logging at WARNING (Orbax logs every file at INFO);
    flag errors (unknown flag, missing required flag, bad value, missing config file) and
    :data:`USER_ERRORS` are reported as one line ``kindjax.<name>: message``, exit status 1."""
    from absl import app, logging

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as e:
            _exit(name, str(e))

    app.run(guarded, flags_parser=lambda argv: parse_flags(argv, name))


def parse_flags(argv: list[str], name: str) -> list[str]:
    """Parses ``argv`` into absl's ``FLAGS`` and returns the remaining arguments; exits with
    ``kindjax.<name>: message`` on a flag error or a config file that does not exist
    (ml_collections would report that only at the config's first use, with a traceback)."""
    from absl import flags
    from ml_collections import config_flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _exit(name, f"{_one_line(str(e))} (see --help)")
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


def _one_line(message: str) -> str:
    """The first and last non-empty lines of ``message`` (for a config file that raised, the
    flag and the exception), joined."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[1:][-1:])


def _exit(name: str, message: str) -> NoReturn:
    sys.exit(f"kindjax.{name}: {message}")
