"""One style for every command-line tool: absl flags (ml_collections config files where a
command takes a config), and errors a user can fix printed as one line.

    if __name__ == "__main__":
        define_flags()          # flags are defined only when the module runs as a program
        cli.run(main, "encode")
"""
from __future__ import annotations

import sys
from typing import Callable

#: Errors with a message that names the problem and the fix; anything else is a bug and keeps
#: its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def run(main: Callable[[list[str]], object], name: str) -> None:
    """``absl.app.run(main)`` with absl logging at WARNING (Orbax logs every file at INFO) and
    :data:`USER_ERRORS` reported as ``kindjax.<name>: message`` with exit status 1."""
    from absl import app, logging

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as e:
            sys.exit(f"kindjax.{name}: {e}")

    app.run(guarded)
