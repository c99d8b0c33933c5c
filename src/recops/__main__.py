"""``python -m recops`` is the ``recops`` command."""

from recops.cli import main

main()
