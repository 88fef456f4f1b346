"""Run the real `bunker` CLI and kill it with SIGKILL at a named point of its code: the process
sends itself SIGKILL when the function $BUNKER_TEST_KILL_AT ("module:Name" or
"module:Class.method") is called for the $BUNKER_TEST_KILL_NTH time (default 1), before the call
($BUNKER_TEST_KILL_WHEN "before", the default) or once it returned ("after"). The name is patched
in the module given, so name the module that calls it (a function imported by name into another
module is patched there). Used by tests/test_node_faults.py to hit windows that kills at random
moments rarely hit; nothing of it is in bunker itself."""

import importlib
import os
import signal
import sys
from typing import Any

module_name, _, qualname = os.environ["BUNKER_TEST_KILL_AT"].partition(":")
nth = int(os.environ.get("BUNKER_TEST_KILL_NTH", "1"))
when = os.environ.get("BUNKER_TEST_KILL_WHEN", "before")
assert when in ("before", "after"), when
owner: Any = importlib.import_module(module_name)
*path, attr = qualname.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, attr)
calls = 0


def _killed_here(*args: Any, **kwargs: Any) -> Any:
    global calls
    calls += 1
    if calls == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result


setattr(owner, attr, _killed_here)
os.environ.pop("BUNKER_TEST_KILL_AT")  # the command's own children run unpatched

from bunker.cli.main import main  # noqa: E402

sys.argv[0] = "bunker"
main()
