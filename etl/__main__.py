"""Run the command line with ``python -m etl``."""

from etl.cli import main

main()
