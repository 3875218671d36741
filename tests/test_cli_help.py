"""Every command and every option of the command line says what it is for."""

from __future__ import annotations

import click

from edge_peft.cli import main_group


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_command_and_option_has_help_text():
    missing = [f"{path}: {' / '.join(p.opts)}" for path, command in _commands(main_group)
               for p in command.params if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    missing += [path for path, command in _commands(main_group) if not (command.help or "").strip()]
    assert missing == []
