"""The command map of ``bunker`` (cli/main.py): each command's modules are imported only when it
runs, so the map must name every module that adds to a command, and every command."""

from __future__ import annotations

import importlib
import pkgutil

import click

import bunker.cli
from bunker.cli.main import COMMAND_MODULES, cli


def _modules(command: click.Command) -> set[str]:
    out = {command.callback.__module__.rsplit(".", 1)[1]} if command.callback else set()
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            out |= _modules(sub)
    return out


def test_every_command_and_module_is_in_the_map() -> None:
    for info in pkgutil.iter_modules(bunker.cli.__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"bunker.cli.{info.name}")
    found = {name: _modules(command) for name, command in cli.commands.items()}
    assert found == {name: set(mods) for name, mods in COMMAND_MODULES.items()}
    mapped = {m for mods in COMMAND_MODULES.values() for m in mods}
    every = {i.name for i in pkgutil.iter_modules(bunker.cli.__path__) if i.name.startswith("cmd_")}
    assert every == mapped, every ^ mapped
