"""User-facing errors: one exception type and the wrapper every stage's ``main()`` runs under."""

from __future__ import annotations

import sys
from collections.abc import Callable


class VaelabError(Exception):
    """A problem the user can fix (bad params, corrupt data, unreachable store).

    Stages print its message without a stack trace and exit with status 2.
    """


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main()``; user errors and Ctrl-C become a one-line message + exit code."""
    try:
        main()
    except VaelabError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
