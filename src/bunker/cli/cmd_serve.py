"""`bunker serve`: offer one repository directory to clients over ssh, inetd/systemd or a unix socket."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from bunker import interrupt
from bunker.cli.main import cli, handles_errors
from bunker.errors import BunkerError, ExitCode

if TYPE_CHECKING:  # the server's modules load only when a server runs
    from bunker.node.serve import ServeConfig


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise BunkerError(
            f"--socket-mode {value!r} is not an octal file mode", "write it like 600 or 660", exit_code=ExitCode.USAGE
        )
    return mode


@cli.command()
@click.option("--stdio", is_flag=True, help="Serve one client on stdin/stdout (ssh, inetd, systemd Accept=yes).")
@click.option("--socket", "socket_path", metavar="PATH", help="Listen on a unix socket, a thread per client.")
@click.option("--socket-mode", default="600", show_default=True, help="Permissions of the --socket file (octal).")
@click.option(
    "--repo",
    "-r",
    "repo",
    required=True,
    metavar="DIR",
    help="The repository directory; the only one clients can reach (made when a client runs `init`).",
)
@click.option(
    "--append-only",
    is_flag=True,
    help="Never replace or delete an object (except sessions/ leases): a client cannot destroy backups.",
)
@click.option("--json", "as_json", is_flag=True, hidden=True)
@handles_errors
def serve(stdio: bool, socket_path: str | None, socket_mode: str, repo: str, append_only: bool, **_: Any) -> None:
    """Serve a repository to `ssh://` and `unix://` clients.

    Over ssh the client starts `bunker serve --stdio --repo DIR` itself; a forced command in
    authorized_keys (`command="bunker serve --stdio --repo DIR --append-only",restrict ssh-ed25519
    ...`) pins the directory and the mode whatever the client asks. Log lines go to stderr.
    """
    import os


    check_one_front_end("bunker serve", stdio, socket_path)
    from bunker.storage.url import local_path

    directory = local_path(repo)  # a typo like sftp:/x is refused, never served as a new directory
    if directory is None:
        raise BunkerError(
            f"bunker serve serves a directory on this machine, not the URL {repo!r}",
            "pass the repository's directory with --repo DIR (clients reach it through ssh:// or unix://)",
            exit_code=ExitCode.USAGE,
        )
    from bunker.node.serve import ServeConfig

    config = ServeConfig(os.path.abspath(directory), append_only)
    mode = "append-only" if append_only else "read-write"
    run_front_end(config, stdio, socket_path, socket_mode, f"serving {config.repo} ({mode})")


def check_one_front_end(command: str, stdio: bool, socket_path: str | None) -> None:
    """Exactly one of --stdio and --socket PATH (before anything is opened)."""
    if stdio == bool(socket_path):
        raise BunkerError(
            f"{command} needs exactly one of --stdio and --socket PATH",
            "use --stdio under ssh, inetd or systemd (Accept=yes), --socket PATH for a standing server",
            exit_code=ExitCode.USAGE,
        )


def run_front_end(config: ServeConfig, stdio: bool, socket_path: str | None, socket_mode: str, what: str) -> None:
    """Serve ``config`` on stdin/stdout (one client) or on a unix socket until SIGTERM or Ctrl-C;
    exits the process with the server's code (`bunker serve`, `bunker node serve`)."""
    from bunker.node.serve import log
    from bunker.node.serve_frontends import SocketServer, serve_stdio

    if stdio:
        sys.exit(serve_stdio(config))
    assert socket_path is not None
    server = SocketServer(socket_path, config, _mode(socket_mode))

    def stop(*_: object) -> None:
        interrupt.note_raised(signal.SIGTERM)  # a decryption that swallows it raises it again (interrupt.py)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log(f"{what} on {server.path}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
