"""Command-line interface: commands, human and --json output, progress, exit codes."""
