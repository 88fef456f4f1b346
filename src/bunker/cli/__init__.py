"""Command-line interface: commands, human and --json output, progress, exit codes."""

from bunker import interrupt

# before the heavy imports of the console script: Ctrl-C while bunker starts ends it quietly
interrupt.quiet_start()
