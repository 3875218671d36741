"""``python -m edge_peft.store <command>``: the store commands without the main CLI."""

from __future__ import annotations

import click

from ..errors import UserError
from .cli import pull, push, serve, store, sync


class _OneLineErrors(click.Group):
    """Print a UserError as one line and exit 2, like the main ``edge-peft`` CLI."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_OneLineErrors)
def main() -> None:
    """edge-peft adapter store: serve, store, push, pull, sync."""


for command in (serve, store, push, pull, sync):
    main.add_command(command)

if __name__ == "__main__":
    main()
