"""CLI: the PromptCoT loop's stages (promptcot dedup)."""
from __future__ import annotations

from pathlib import Path

import click

from promptcot_engine.errors import InputError


@click.command()
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file of records to deduplicate.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file to write the kept records to (written atomically).")
@click.option("--key", default="problem", show_default=True, help="Field holding the text to compare.")
def dedup(input_path: Path, output: Path, key: str):
    """Drop exact, then near duplicate records (MinHash LSH confirmed by word-set Jaccard > 0.2); the first
    occurrence wins."""
    from promptcot_engine.em.dedup import dedup as drop_duplicates
    from promptcot_engine.jsonl import iter_jsonl, write_jsonl

    records = []
    for line_number, record in iter_jsonl(input_path):
        if key not in record:
            raise InputError(f"{input_path}:{line_number}: missing field {key!r}")
        if not isinstance(record[key], str):
            kind = type(record[key]).__name__
            raise InputError(f"{input_path}:{line_number}: field {key!r} must be a string, got {kind}")
        records.append(record)
    kept, stats = drop_duplicates(records, key=key)
    write_jsonl(output, kept)
    click.echo(
        f"read {stats['input']}, dropped {stats['exact_duplicates']} exact and {stats['near_duplicates']} near "
        f"duplicates, wrote {stats['kept']} to {output}"
    )
