"""The ``bunker`` command."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from bunker import cycle_collector, dirs, interrupt
from bunker.build_info import version_text
from bunker.child_env import withhold_secrets
from bunker.cli import interrupted
from bunker.cli.context import Options
from bunker.cli.output import Output
from bunker.errors import BunkerError, ExitCode
from bunker.storage.full import FULL_ERRNOS
from bunker.storage.url import local_path

F = TypeVar("F", bound=Callable[..., Any])


def common(f: F) -> F:
    """Options every command takes (also accepted after the command name)."""
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)
    f = click.option("--put-key", type=click.Path(dir_okay=False), help="Put key file [BUNKER_PUT_KEY].")(f)
    f = click.option("--master-key", type=click.Path(dir_okay=False), help="Master key file [BUNKER_MASTER_KEY].")(f)
    f = click.option(
        "--remote-path",
        metavar="CMD",
        help="The bunker command on the server of an ssh:// repository [BUNKER_REMOTE_PATH; default: bunker].",
    )(f)
    f = click.option(
        "--repo",
        "-r",
        help="Repository path or URL [BUNKER_REPO; default: the local repository in the user's data directory].",
    )(f)
    return f


def handles_errors(f: F) -> F:
    """Turn BunkerError into its message, hint and exit code, and SIGINT/SIGTERM into the
    command's own interrupt message and 130/143."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = Output(bool(kwargs.get("as_json")))
        interrupt.install()  # from here on SIGINT/SIGTERM unwind the command (leases, worker pools)
        try:
            try:
                return f(*args, **kwargs)
            except BunkerError as exc:
                out.error(exc)
                sys.exit(exc.exit_code)
            except OSError as exc:  # a filesystem error no layer gave a message of its own
                from bunker.cli.files import unexpected_os_error

                # a full disk under bunker's own files names those directories; anything else names the file
                failure = local_files_full(exc) if exc.errno in FULL_ERRNOS else unexpected_os_error(exc)
                out.error(failure)
                sys.exit(failure.exit_code)
            finally:
                interrupt.ignore()  # the command's work is over: it exits with its own code
        except KeyboardInterrupt as exc:
            # the command was stopped, or a signal came just as it ended (before the line above):
            # reported here, never click's "Aborted!"
            interrupt.ignore()
            sys.exit(interrupted.report(out, exc))

    return wrapper  # type: ignore[return-value]


def local_files_full(exc: OSError) -> BunkerError:
    """The error for a full disk under this machine's own bunker files (keys, state, spool, caches)."""
    where = f" ({exc.filename})" if exc.filename else ""
    places = ", ".join(f"`df -h {d}`" for d in dict.fromkeys((dirs.config_dir(), dirs.data_dir(), dirs.cache_dir())))
    return BunkerError(
        f"this machine's disk is full{where}: {exc.strerror or exc}",
        f"free space on the disk that holds bunker's files on this machine ({places} show them), then run the same "
        "command again",
        exit_code=ExitCode.FATAL,
    )


def make_options(kwargs: dict[str, Any]) -> tuple[Options, Output]:
    remote_path = kwargs.pop("remote_path", None)
    if remote_path:
        # through the environment: worker processes reopen the repository by its URL
        os.environ["BUNKER_REMOTE_PATH"] = remote_path
    opts = Options(kwargs.pop("repo"), kwargs.pop("master_key"), kwargs.pop("put_key"), kwargs.pop("as_json"))
    local_path(opts.repo_url)  # a URL typo is refused before anything (a spool, a directory) is made for it
    return opts, Output(opts.as_json)


# each command's modules, imported only when the command runs: a run of one command does not pay
# for importing every other (tests/test_cli_commands.py checks the map against the modules)
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "backup": ("cmd_backup",),
    "check": ("cmd_check",),
    "compare": ("cmd_mirror",),
    "export-tar": ("cmd_export",),
    "forget": ("cmd_forget",),
    "forward": ("cmd_forward",),
    "index": ("cmd_check",),
    "init": ("cmd_backup",),
    "key": ("cmd_key", "cmd_clients", "cmd_node_keys"),
    "ls": ("cmd_restore",),
    "migrate": ("cmd_migrate",),
    "node": ("cmd_node", "cmd_node_admin", "cmd_witness"),
    "policy": ("cmd_policy",),
    "prune": ("cmd_prune",),
    "requests": ("cmd_requests",),
    "restore": ("cmd_restore",),
    "serve": ("cmd_serve",),
    "snapshots": ("cmd_restore",),
    "status": ("cmd_status",),
    "sync": ("cmd_mirror",),
    "unforget": ("cmd_unforget",),
    "verify": ("cmd_check",),
}


class LazyCommands(click.Group):
    """The top-level group: a command's modules are imported when it is looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for module in COMMAND_MODULES.get(cmd_name, ()):
            importlib.import_module(f"bunker.cli.{module}")
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_all_commands()
        return super().list_commands(ctx)


def load_all_commands() -> None:
    """Import every command module (``bunker --help`` lists them all)."""
    for modules in COMMAND_MODULES.values():
        for module in modules:
            importlib.import_module(f"bunker.cli.{module}")


@click.group(cls=LazyCommands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version_text(), prog_name="bunker")
def cli() -> None:
    """Bunker: encrypted, deduplicating backups that need no password to take.

    Exit codes: 0 ok/note, 1 warn, 2 usage, 3 err (backup taken, some items missing), 4 fatal,
    5 compared copies differ,
    10 passphrase needed but no terminal, 11 wrong passphrase, 12 key missing, 13 no repository,
    14 damage found, 15 repository or key unusable.
    """


def main() -> None:
    withhold_secrets()  # before anything can start a child process
    limit_malloc_arenas()
    cycle_collector.tune()
    cli(prog_name="bunker")


MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas. Every thread that allocates multi-MB buffers (reading, compressing,
    encrypting) otherwise gets its own arena, which keeps its freed memory: measured 20-50 MB of
    peak RSS saved at no cost in speed. Worker processes inherit the setting through the environment."""
    if not sys.platform.startswith("linux"):
        return
    os.environ.setdefault("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, int(os.environ["MALLOC_ARENA_MAX"]))
    except (OSError, AttributeError, ValueError):
        pass  # not glibc (musl has no arenas to limit) or a malformed value from the user


def default_client_name() -> str:
    """BUNKER_CLIENT, else a random pseudonym: client names are public (certificates, envelopes),
    and the host name would tell anyone who holds the repository which machine it backs up."""
    return os.environ.get("BUNKER_CLIENT") or f"client-{os.urandom(4).hex()}"


EXIT_FOR_LEVEL = {
    "ok": ExitCode.OK,
    "note": ExitCode.OK,
    "warn": ExitCode.WARN,
    "err": ExitCode.ERR,
    "fatal": ExitCode.FATAL,
}
