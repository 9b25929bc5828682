"""CLI: promptcot convert."""
from __future__ import annotations

from pathlib import Path

import click

from promptcot_engine.errors import InputError


@click.command()
@click.option("--model", required=True, help="A .gguf file, an HF checkpoint directory, or a packaged model name.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
@click.option("--dtype", default="float32", show_default=True, help="Dtype of the written weights.")
def convert(model: str, output: Path, dtype: str):
    """Write MODEL as an HF checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    from promptcot_engine.models.hf_checkpoint import save_hf_checkpoint
    from promptcot_engine.models.loader import load_model

    if output.exists() and any(output.iterdir()):
        raise InputError(f"{output}: directory exists and is not empty")
    decoder, checkpoint = load_model(model, dtype=dtype, device="cpu")
    save_hf_checkpoint(output, checkpoint.config, decoder.checkpoint_state_dict(), checkpoint.tokenizer)
    click.echo(f"wrote {output}")
