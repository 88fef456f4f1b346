"""bunker policy set | show: the owner's policy for every client and node (repo/policy.py,
docs/hierarchy.md "Policy")."""

from __future__ import annotations

import datetime
import tomllib
from typing import Any

import click

from bunker.cli import context
from bunker.cli.main import cli, common, handles_errors, make_options
from bunker.cli.output import human_bytes
from bunker.errors import BunkerError, ExitCode
from bunker.node.node_dir import parse_size
from bunker.node.spool import parse_age
from bunker.repo.policy import NODE_SETTINGS, SETTINGS, make_policy, read_policies
from bunker.repo.policy_memory import policy_in_force

EXAMPLE = """[defaults]
keep-daily = 7
keep-weekly = 4
checkpoint-interval = "5m"
silent-after = "2d"

[clients.laptop]
keep-last = 3

fixed = ["checkpoint-interval"]   # (at the top of the file)"""


@cli.group()
def policy() -> None:
    """The owner's policy: retention, backup defaults and silence limits for every client."""


def _usage(what: str, path: str) -> BunkerError:
    return BunkerError(
        f"{path}: {what}",
        f"fix the file and run the command again; nothing was stored. A policy file looks like:\n{EXAMPLE}",
        exit_code=ExitCode.USAGE,
    )


def _settings(table: Any, where: str, path: str, known: dict[str, tuple[str, str]] = SETTINGS) -> dict[str, Any]:
    """A table of the file as policy settings of ``known`` (ages and sizes given as text become
    seconds and bytes)."""
    if not isinstance(table, dict):
        raise _usage(f"{where} must be a table", path)
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise _usage(f"{where}: unknown setting {key!r} (known: {', '.join(known)})", path)
        kind = known[key][0]
        if kind in ("age", "size") and isinstance(value, str):
            try:
                value = parse_age(value) if kind == "age" else parse_size(value)
            except BunkerError:
                example = "90s, 5m, 12h, 3d" if kind == "age" else "500M, 20G, 1.5T"
                raise _usage(
                    f"{where}: {key} = {value!r} is not {'an age' if kind == 'age' else 'a size'} (e.g. {example})",
                    path,
                ) from None
        out[key] = value
    return out


def read_policy_file(
    path: str,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], tuple[str, ...], dict[str, Any], dict[str, dict[str, Any]]]:
    """(defaults, per-client settings, fixed settings, node defaults, per-node settings) from a
    TOML policy file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise BunkerError(
            f"cannot read {path}: {exc.strerror or exc}", "check the path", exit_code=ExitCode.USAGE
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise _usage(f"not valid TOML ({exc})", path) from None
    unknown = sorted(set(doc) - {"defaults", "clients", "fixed", "node-defaults", "nodes"})
    if unknown:
        raise _usage(
            f"unknown section {unknown[0]!r} (a policy file has [defaults], [clients.NAME], [node-defaults], "
            "[nodes.NAME] and fixed)",
            path,
        )
    defaults = _settings(doc.get("defaults", {}), "[defaults]", path)
    raw_clients = doc.get("clients", {})
    if not isinstance(raw_clients, dict):
        raise _usage("clients must be tables: [clients.NAME]", path)
    clients = {name: _settings(t, f"[clients.{name}]", path) for name, t in raw_clients.items()}
    fixed = doc.get("fixed", [])
    if not isinstance(fixed, list) or not all(isinstance(f, str) and f in SETTINGS for f in fixed):
        raise _usage(f"fixed must list settings by name (known: {', '.join(SETTINGS)})", path)
    node_defaults = _settings(doc.get("node-defaults", {}), "[node-defaults]", path, NODE_SETTINGS)
    raw_nodes = doc.get("nodes", {})
    if not isinstance(raw_nodes, dict):
        raise _usage("nodes must be tables: [nodes.NAME]", path)
    nodes = {name: _settings(t, f"[nodes.{name}]", path, NODE_SETTINGS) for name, t in raw_nodes.items()}
    return defaults, clients, tuple(fixed), node_defaults, nodes


def _age_text(seconds: float) -> str:
    """An age as the shortest exact text: 2d, 12h, 5m, 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _show_settings(out: Any, title: str, settings: dict[str, Any], fixed: tuple[str, ...]) -> None:
    out.line(title)
    if not settings:
        out.line("  (nothing set)")
    for key, value in settings.items():
        kind = (SETTINGS.get(key) or NODE_SETTINGS[key])[0]
        shown = _age_text(float(value)) if kind == "age" else human_bytes(value) if kind == "size" else value
        out.line(f"  {key} = {shown}" + ("  (fixed: the command line may not override it)" if key in fixed else ""))


@policy.command("set")
@common
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@handles_errors
def set_policy(file: str, **kwargs: Any) -> None:
    """Store FILE (TOML) as the repository's next policy version (needs the master key). It
    reaches clients and nodes below with the other records."""
    defaults, clients, fixed, node_defaults, nodes = read_policy_file(file)
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    context.refuse_on_node(repo, "`bunker policy set`")
    master = context.load_master(opts, repo, "signing a policy")
    state = read_policies(repo)
    top = state.highest
    try:
        data = make_policy(
            master.signing,
            repo.repo_id,
            (top.version + 1) if top else 1,
            top.name if top else "",
            defaults,
            clients,
            fixed,
            node_defaults,
            nodes,
        )
    except ValueError as exc:
        raise _usage(str(exc), file) from None
    name = repo.put_object("policy", data)
    known = {c.client for c in repo.certificates()}
    unknown = sorted(set(clients) - known)
    version = (top.version + 1) if top else 1
    out.document({"policy": name, "version": version, "replaces": top.name if top else "", "unknown_clients": unknown})
    out.line(f"policy version {version} stored as {name}" + (f" (replaces version {top.version})" if top else ""))
    if unknown:
        out.info(
            f"note: no certificate names client(s) {', '.join(unknown)} yet: their settings apply once "
            "`bunker key new-client` certifies them"
        )
    out.info("clients and nodes apply it at their next run (nodes pass it down with the other records)")


@policy.command("show")
@common
@click.option("--client", help="The settings that apply to this client (its own over the defaults).")
@click.option("--node", help="The settings that apply to this node (its own over the node defaults).")
@handles_errors
def show_policy(client: str | None, node: str | None, **kwargs: Any) -> None:
    """The policy in force here (no key needed): the repository's newest version, or the one
    this machine applied before if the repository holds an older one."""
    opts, out = make_options(kwargs)
    repo = context.open_repository(opts)
    current, events = policy_in_force(repo)
    doc: dict[str, Any] = {
        "repository": repo.repo_id,
        "policy": current.to_json() if current else None,
        "events": [{"level": lv, "code": c, "message": m} for lv, c, m in events],
    }
    if client is not None:
        doc["client"] = client
        doc["settings"] = current.settings_for(client) if current else {}
    if node is not None:
        doc["node"] = node
        doc["node_settings"] = current.settings_for_node(node) if current else {}
    out.document(doc)
    for level, _code, message in events:
        out.info(f"{level}: {message}")
    if current is None:
        out.line("no policy is set: every client runs with its own command-line settings")
        return
    out.line(f"policy version {current.version} ({current.name}), set {_when(current.time)}")
    if client is not None or node is not None:
        if client is not None:
            _show_settings(out, f"settings for client {client!r}:", current.settings_for(client), current.fixed)
        if node is not None:
            _show_settings(out, f"settings for node {node!r}:", current.settings_for_node(node), ())
        return
    _show_settings(out, "defaults:", current.defaults, current.fixed)
    for name, settings in sorted(current.clients.items()):
        _show_settings(out, f"client {name!r}:", settings, current.fixed)
    if current.node_defaults or current.nodes:
        _show_settings(out, "node defaults:", current.node_defaults, ())
        for name, settings in sorted(current.nodes.items()):
            _show_settings(out, f"node {name!r}:", settings, ())
