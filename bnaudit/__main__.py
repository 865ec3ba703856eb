"""``python -m bnaudit``: the same as the ``bnaudit`` console script."""

from bnaudit.cli import main

main()
