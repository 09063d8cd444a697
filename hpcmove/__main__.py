"""`python -m hpcmove` is the `hpcmove` command."""
from .cli import main

main()
