"""`actcache analyse | steer | attribute | hooks`: thin layers over harvest/session.py (a Session over one SAE)
and harvest/analysis.py (list_hooks)."""

from __future__ import annotations

import json

import click

from ..common.progress import quiet_option

_model = click.option("--model", default=None, help="Model spec (default: the one the SAE's cfg.json names).")
_device = click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available).")
_tokenizer = click.option("--tokenizer", default=None, help="Tokenizer spec, for a model without one (random:).")
_json = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
_quiet = quiet_option


def _emit(obj: dict, as_json: bool, text: str) -> None:
    """Print the result (JSON: null for a non-finite number); then, if any number came out NaN or
    infinite, exit non-zero naming them (common/finite.py)."""
    from ..common.finite import NonFiniteResult, describe, finite_json

    clean, bad = finite_json(obj)
    bad = sorted(set(bad) | set(clean.pop("non_finite", None) or []))
    if as_json:
        click.echo(json.dumps({**clean, "non_finite": bad}, indent=2, allow_nan=False))
    else:
        click.echo(text)
    if bad:
        raise NonFiniteResult(f"non-finite results (NaN or infinity; null in --json): {describe(bad)}")


@click.command("analyse")
@click.argument("sae_dir")
@click.option("--prompt", required=True, help="The text to encode.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(0), help="Latents shown per token.")
@click.option("--include-special-tokens", is_flag=True, help="Count BOS/EOS/pad positions in the error metrics.")
@_model
@_device
@_tokenizer
@_json
@_quiet
def analyse_command(sae_dir, prompt, top, include_special_tokens, model, device, tokenizer, as_json) -> None:
    """Encode PROMPT's activations at the SAE's hook: the top latents of every token and the
    reconstruction error (mse, fvu, cossim)."""
    from .session import Session

    a = Session(sae_dir, model=model, device=device, tokenizer=tokenizer).analyse(
        prompt, top, include_special_tokens=include_special_tokens)
    _emit(a.to_dict(), as_json, a.table())


@click.command("steer")
@click.argument("sae_dir")
@click.option("--feature", required=True, type=int, help="The latent whose decoder direction is added.")
@click.option("--strength", default=8.0, show_default=True, type=float, help="Multiple of the decoder row added.")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(1), help="Tokens to generate.")
@click.option("--positions", default="all", show_default=True, type=click.Choice(["all", "prompt"]),
              help="Steer every position, or the prompt's only.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: greedy; above 0: sampled (with --seed).")
@click.option("--seed", default=None, type=int, help="Seed of the sampling (the same draws for both continuations).")
@_model
@_device
@_tokenizer
@_json
@_quiet
def steer_command(sae_dir, feature, strength, prompt, max_new_tokens, positions, temperature, seed, model, device,
                  tokenizer, as_json) -> None:
    """Generate after PROMPT with the latent's decoder direction times STRENGTH added at the SAE's hook;
    the plain continuation beside it."""
    from .session import Session, check_strength, check_temperature

    check_strength(strength, "--strength")  # before the model loads
    check_temperature(temperature, "--temperature")
    s = Session(sae_dir, model=model, device=device, tokenizer=tokenizer).steer(
        prompt, feature, strength, max_new_tokens, positions=positions, temperature=temperature, seed=seed)
    _emit(s.to_dict(), as_json, f"prompt: {prompt!r}\n" + s.side_by_side())


@click.command("attribute")
@click.argument("sae_dir")
@click.option("--prompt", required=True, help="The text before the target.")
@click.option("--target", required=True, help="The next token whose logit is explained (one token, e.g. ' Paris').")
@click.option("--position", default=-1, show_default=True, type=int, help="The position whose logit is explained.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(0), help="Latents listed.")
@_model
@_device
@_tokenizer
@_json
@_quiet
def attribute_command(sae_dir, prompt, target, position, top, model, device, tokenizer, as_json) -> None:
    """Each latent's direct contribution to the logit of TARGET after PROMPT (final normalisation's
    scale frozen), the top ones, and the remainder (b_dec, SAE error, later layers, biases)."""
    from .session import Session

    r = Session(sae_dir, model=model, device=device, tokenizer=tokenizer).attribute(
        prompt, target, position=position, top=top)
    _emit(r.to_dict(), as_json, r.table())


@click.command("hooks")
@click.argument("model")
@_device
@_json
def hooks_command(model, device, as_json) -> None:
    """List MODEL's hook names with the shape each has on a 5-token probe pass, its per-token width
    (heads flattened, as a harvest stores it) and whether it fires."""
    from dataclasses import asdict

    from .analysis import PROBE, list_hooks

    rows = list_hooks(model, device=device)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    w = max(len(r.name) for r in rows)
    click.echo(f"{'hook':<{w}}  {'width':>6}  shape (1 x {PROBE} tokens)")
    for r in rows:
        width = str(r.width) if r.width is not None else "-"
        shape = "x".join(map(str, r.shape)) if r.shape else "does not fire (switched off)"
        click.echo(f"{r.name:<{w}}  {width:>6}  {shape}")
