"""``python -m laneway``: the same as the ``laneway`` command."""

from laneway.cli import main

main()
