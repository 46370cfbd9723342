"""`actcache eval`: score SAEs with the model on held-out tokens of a store (a thin layer over
actcache.evaluate.evaluate). Its options are EvalOptions' fields (common/options.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import click

from .common.options import command_options, configurable, from_click, option, storage_options_option
from .common.progress import quiet_option


@configurable
@dataclass
class EvalOptions:
    """The options of `actcache eval` (evaluate() takes the same names as keywords)."""

    sae_dirs: list[str] = option([], "An SAE folder in the SAELens format (repeatable).", kind="str_list",
                                 flag="--sae")
    store: str | None = option(None, "The store to take held-out tokens from (default: the run's).", kind="str")
    model: str | None = option(None, "Model spec (default: the one the SAE or the store names).", kind="str")
    tokens: int | None = option(None, "Score at most this many tokens (e.g. 16k; default: the whole held-out "
                                "part).", kind="count", unit="tokens", low=1)
    batch_size: int = option(8, "Token windows per forward pass.", unit="sequences", low=1)
    device: str | None = option(None, "cpu, cuda, cuda:1 (default: cuda when available).", kind="str")
    dtype: str = option("float32", "The model's compute dtype.", kind="choice",
                        choices=("float32", "bfloat16", "float16"))
    held_out: str | None = option(None, "START:STOP in sequences of the store to evaluate on (default: the "
                                  "store's held-out part).", kind="range", unit="sequences")
    include_special_tokens: bool = option(False, "Replace and score BOS/EOS/pad positions too.")
    force: bool = option(False, "Evaluate with a model other than the store's.")
    as_json: bool = option(False, "Print the records as JSON.", flag="--json")
    storage_options: tuple[str, ...] = storage_options_option()


@click.command("eval")
@click.argument("runs_or_saes", nargs=-1)
@command_options(EvalOptions)
@quiet_option
def eval_command(runs_or_saes: tuple[str, ...], **given: Any) -> None:
    """Splice each SAE of RUNS_OR_SAES (run folders or SAE folders) into the model on held-out token
    windows of the store and report CE loss score, KL and activation metrics; writes eval.json in each
    SAE folder and the columns in the run's summary. Transcoders replace their output hook with their
    map of their input hook."""
    from .evaluate import evaluate, non_finite_error, records_table

    opts = asdict(EvalOptions(**from_click(EvalOptions, given)))
    as_json = opts.pop("as_json")
    opts["storage_options"] = list(opts["storage_options"])
    records = evaluate(runs_or_saes, **opts, write=True)
    if as_json:
        click.echo(json.dumps(records, indent=2, allow_nan=False))
    else:
        click.echo(records_table(records))
        r = records[0]
        s = r["sequences_scored"]
        click.echo(f"\n{r['ce_tokens']} token positions of sequences {s['start_sequence']}:{s['stop_sequence']} of "
                   f"{r['store']} (fingerprint {r['store_fingerprint']}); eval.json in each SAE folder")
    bad = non_finite_error(records)
    if bad is not None:
        raise bad
