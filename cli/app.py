"""`clim-fast`: one typer app; each command lives in its own module and registers itself here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from shards.errors import UserError

app = typer.Typer(
    name="clim-fast",
    help="CLIM contrastive pretraining (MoCo v2 + center-wise local image mixture), fed by DALI.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("cli.shard", "cli.train", "cli.mine", "cli.eval", "cli.demo")


def _register_all() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    try:
        app(standalone_mode=True)
    except UserError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
