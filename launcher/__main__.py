"""`python -m launcher ...` is `pfc ...` (for machines where the package is on PYTHONPATH, not installed)."""

from launcher.cli import main

main()
