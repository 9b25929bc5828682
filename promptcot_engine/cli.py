"""The `promptcot` command. Each subsystem defines its own subcommands beside its code (a `commands.py`);
this module only gathers them and turns errors into exit codes: a user error (InputError, a bad option)
prints one `error: ...` line and exits 2, an internal error exits 1."""
from __future__ import annotations

import sys

import click

from promptcot_engine.errors import InputError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """promptcot_engine: generate, score and train with one engine, and run the PromptCoT 2.0 EM loop."""


def _register() -> None:
    from promptcot_engine.benchmarks.commands import bench
    from promptcot_engine.em.commands import annotate, dedup, em, estep, mstep, synthesize
    from promptcot_engine.engine.commands import generate, score
    from promptcot_engine.models.commands import convert
    from promptcot_engine.selfplay.commands import selfplay, sft_data
    from promptcot_engine.train.commands import train

    for command in (annotate, bench, convert, dedup, em, estep, generate, mstep, score, selfplay, sft_data, synthesize,
                    train):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
