"""docs/options.md: the reference tables of every command's options and every sweep key, generated
from the option declarations (common/options.py). Here, at the top layer, because it names the
options of both stages.

    python -m actcache.options_reference            # print it
    python -m actcache.options_reference --write    # rewrite docs/options.md (a test fails when stale)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common.options import markdown_table, options_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"

INTRO = """# Options reference

Generated from the option declarations (`common/options.py`) by `python -m actcache.options_reference
--write`; a test fails when this file is stale. Every option has one name; an old name still works for
one release and prints a one-line deprecation warning on stderr. A unit column says what a number
counts wherever a number could mean two things (`batch_size` of a forward pass counts sequences; the
sweep's `batch_tokens` counts tokens). A range of a store's sequences is written `START:STOP`
everywhere (the sweep's `held_out`, `actcache eval --held-out`); the harvest's `--held-out` is not a
range but the size of the part it sets aside at the store's end (a percentage, or a token count), and
`actcache features --held-out-only` reads that part alone. Unknown or misspelt options and keys are errors.

To add an option, add one field made with `option(default, help, unit=..., low=...)` to the command's
dataclass (or an `Option` to an architecture's `keys`): the command line, the config-file key, the
checks, `help()` and these tables follow; then run the command above."""


def sections() -> list[tuple[str, str]]:
    """(title, markdown) of each table, in the order of the document."""
    from .eval_cli import EvalOptions
    from .harvest.analysis_cli import AnalyseOptions, AttributeOptions, HooksOptions, SteerOptions
    from .harvest.config import HarvestConfig
    from .train.bench_read import BenchReadOptions
    from .train.cli import TrainOptions
    from .train.compare_cli import CompareOptions
    from .train.config import readme_tables
    from .train.features import FeatureOptions
    from .train.features_cli import FeaturesCommandOptions

    return [
        ("`actcache harvest`", markdown_table(options_of(HarvestConfig).values())),
        ("`actcache train STORE`", markdown_table(options_of(TrainOptions).values())),
        ("Sweep configuration (`actcache train --config sweep.toml`)", readme_tables()),
        ("`actcache eval [RUN_OR_SAE...]`", markdown_table(options_of(EvalOptions).values())),
        ("`actcache features RUN`", markdown_table(options_of(FeaturesCommandOptions).values())),
        ("`FeatureOptions` (Python: `write_features(..., options=FeatureOptions(...))`)",
         markdown_table(options_of(FeatureOptions).values(), cli=False)),
        ("`actcache analyse SAE_DIR`", markdown_table(options_of(AnalyseOptions).values())),
        ("`actcache steer SAE_DIR`", markdown_table(options_of(SteerOptions).values())),
        ("`actcache attribute SAE_DIR`", markdown_table(options_of(AttributeOptions).values())),
        ("`actcache hooks MODEL`", markdown_table(options_of(HooksOptions).values())),
        ("`actcache bench-read STORE`", markdown_table(options_of(BenchReadOptions).values())),
        ("`actcache compare RUN_OR_SAE...`", markdown_table(options_of(CompareOptions).values())),
    ]


def render() -> str:
    parts = [INTRO]
    for title, table in sections():
        parts += [f"## {title}", table]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        print(render(), end="")
