"""Command-line interface: commands, human and --json output, progress, exit codes."""

import os

try:
    from bunker import interrupt

    # before the heavy imports of the console script: Ctrl-C while bunker starts ends it quietly
    interrupt.quiet_start()
except KeyboardInterrupt:
    # Ctrl-C while Python was still importing the signal machinery (before quiet_start could
    # take over): the same quiet end, nothing has been done
    os.write(2, b"bunker: interrupted by SIGINT while starting; nothing was done\n")
    os._exit(130)
