"""`python -m actcache`: the same as the `actcache` command."""

from .cli import main

main()
