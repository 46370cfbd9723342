"""`actcache analyse | steer | attribute | hooks`: thin layers over harvest/session.py (a Session over one SAE)
and harvest/analysis.py (list_hooks). Their options are the fields of the dataclasses below
(common/options.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from ..common.options import command_options, configurable, from_click, option
from ..common.progress import quiet_option


def _model() -> Any:
    return option(None, "Model spec (default: the one the SAE's cfg.json names).", kind="str")


def _device() -> Any:
    return option(None, "cpu, cuda, cuda:1 (default: cuda when available).", kind="str")


def _tokenizer() -> Any:
    return option(None, "Tokenizer spec, for a model without one (random:).", kind="str")


def _json() -> Any:
    return option(False, "Print the result as JSON.", flag="--json")


@configurable
@dataclass
class AnalyseOptions:
    """The options of `actcache analyse SAE_DIR`."""

    prompt: str = option(help="The text to encode.")
    top: int = option(5, "Latents shown per token.", unit="latents", low=0)
    include_special_tokens: bool = option(False, "Count BOS/EOS/pad positions in the error metrics.")
    model: str | None = _model()
    device: str | None = _device()
    tokenizer: str | None = _tokenizer()
    as_json: bool = _json()


@configurable
@dataclass
class SteerOptions:
    """The options of `actcache steer SAE_DIR`."""

    feature: int = option(help="The latent whose decoder direction is added.", kind="int", low=0)
    prompt: str = option(help="The text to continue.")
    strength: float = option(8.0, "Multiple of the decoder row added.")
    max_new_tokens: int = option(20, "Tokens to generate.", unit="tokens", low=1)
    positions: str = option("all", "Steer every position, or the prompt's only.", kind="choice",
                            choices=("all", "prompt"))
    temperature: float = option(0.0, "0: greedy; above 0: sampled (with --seed).", low=0)
    seed: int | None = option(None, "Seed of the sampling (the same draws for both continuations).", kind="int")
    model: str | None = _model()
    device: str | None = _device()
    tokenizer: str | None = _tokenizer()
    as_json: bool = _json()


@configurable
@dataclass
class AttributeOptions:
    """The options of `actcache attribute SAE_DIR`."""

    prompt: str = option(help="The text before the target.")
    target: str = option(help="The next token whose logit is explained (one token, e.g. ' Paris').")
    position: int = option(-1, "The position whose logit is explained.")
    top: int = option(10, "Latents listed.", unit="latents", low=0)
    model: str | None = _model()
    device: str | None = _device()
    tokenizer: str | None = _tokenizer()
    as_json: bool = _json()


@configurable
@dataclass
class HooksOptions:
    """The options of `actcache hooks MODEL`."""

    device: str | None = _device()
    as_json: bool = _json()


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
@command_options(AnalyseOptions)
@quiet_option
def analyse_command(sae_dir: str, **given: Any) -> None:
    """Encode PROMPT's activations at the SAE's hook: the top latents of every token and the
    reconstruction error (mse, fvu, cossim)."""
    from .session import Session

    o = AnalyseOptions(**from_click(AnalyseOptions, given))
    a = Session(sae_dir, model=o.model, device=o.device, tokenizer=o.tokenizer).analyse(
        o.prompt, o.top, include_special_tokens=o.include_special_tokens)
    _emit(a.to_dict(), o.as_json, a.table())


@click.command("steer")
@click.argument("sae_dir")
@command_options(SteerOptions)
@quiet_option
def steer_command(sae_dir: str, **given: Any) -> None:
    """Generate after PROMPT with the latent's decoder direction times STRENGTH added at the SAE's hook;
    the plain continuation beside it."""
    from .session import Session, check_strength, check_temperature

    o = SteerOptions(**from_click(SteerOptions, given))
    check_strength(o.strength, "--strength")  # before the model loads
    check_temperature(o.temperature, "--temperature")
    s = Session(sae_dir, model=o.model, device=o.device, tokenizer=o.tokenizer).steer(
        o.prompt, o.feature, o.strength, o.max_new_tokens, positions=o.positions, temperature=o.temperature,
        seed=o.seed)
    _emit(s.to_dict(), o.as_json, f"prompt: {o.prompt!r}\n" + s.side_by_side())


@click.command("attribute")
@click.argument("sae_dir")
@command_options(AttributeOptions)
@quiet_option
def attribute_command(sae_dir: str, **given: Any) -> None:
    """Each latent's direct contribution to the logit of TARGET after PROMPT (final normalisation's
    scale frozen), the top ones, and the remainder (b_dec, SAE error, later layers, biases)."""
    from .session import Session

    o = AttributeOptions(**from_click(AttributeOptions, given))
    r = Session(sae_dir, model=o.model, device=o.device, tokenizer=o.tokenizer).attribute(
        o.prompt, o.target, position=o.position, top=o.top)
    _emit(r.to_dict(), o.as_json, r.table())


@click.command("hooks")
@click.argument("model")
@command_options(HooksOptions)
def hooks_command(model: str, **given: Any) -> None:
    """List MODEL's hook names with the shape each has on a 5-token probe pass, its per-token width
    (heads flattened, as a harvest stores it) and whether it fires."""
    from dataclasses import asdict

    from .analysis import PROBE, list_hooks

    o = HooksOptions(**from_click(HooksOptions, given))
    rows = list_hooks(model, device=o.device)
    if o.as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    w = max(len(r.name) for r in rows)
    click.echo(f"{'hook':<{w}}  {'width':>6}  shape (1 x {PROBE} tokens)")
    for r in rows:
        width = str(r.width) if r.width is not None else "-"
        shape = "x".join(map(str, r.shape)) if r.shape else "does not fire (switched off)"
        click.echo(f"{r.name:<{w}}  {width:>6}  {shape}")
