"""Run the real `bunker` CLI with a Python audit hook that records every path the process opens
(os.open and open() raise the "open" audit event). Used to prove that a backup of unchanged files
reads none of them. The log is NUL-separated paths in $BUNKER_TEST_OPEN_LOG."""

import os
import sys

_fd = os.open(os.environ["BUNKER_TEST_OPEN_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _hook(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        os.write(_fd, os.fsencode(args[0]) + b"\0")


sys.addaudithook(_hook)

from bunker.cli.main import main  # noqa: E402

sys.argv[0] = "bunker"
main()
