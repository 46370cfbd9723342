"""`python -m actcache.train.architectures [--readme docs/sweep-config.md]`: print the sweep-key
tables, or rewrite them in that page between its markers."""

import sys
from pathlib import Path

from ..config import readme_tables, readme_with_tables

if len(sys.argv) == 3 and sys.argv[1] == "--readme":
    path = Path(sys.argv[2])
    path.write_text(readme_with_tables(path.read_text()))
else:
    print(readme_tables())
