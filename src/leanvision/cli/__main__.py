"""`python -m leanvision.cli ...` (what torchrun launches)."""

from leanvision.cli import main

main()
