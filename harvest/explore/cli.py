"""`actcache explore RUN...`: parse the arguments, call serve()."""

from __future__ import annotations

import click

from .server import HOST, PORT


@click.command("explore")
@click.argument("runs_or_saes", nargs=-1, required=True)
@click.option("--features", "features", multiple=True,
              help="A features output folder (repeatable; default: RUN/features, or the one beside an SAE folder).")
@click.option("--host", default=HOST, show_default=True,
              help="Address to listen on (the default serves this machine only).")
@click.option("--port", default=PORT, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free one; the URL is printed).")
@click.option("--model", default=None, help="Model spec (default: the one the SAEs' cfg.json names).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available).")
@click.option("--tokenizer", default=None, help="Tokenizer spec, for a model without one (random:).")
def explore_command(runs_or_saes, features, host, port, model, device, tokenizer) -> None:
    """Serve the feature browser of RUNS_OR_SAES (run or SAE folders) with live panels on the model,
    loaded once: a text's top latents per token with their top contexts, latent cards, steering beside
    the plain continuation, attribution of a target token. Open the printed URL in a browser."""
    from .server import serve

    serve(runs_or_saes, host=host, port=port, features=features, model=model, device=device, tokenizer=tokenizer)
