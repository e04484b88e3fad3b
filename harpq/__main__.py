"""`python -m harpq ...`: the same command line as `harpq ...`."""

from .cli.main import main

main()
