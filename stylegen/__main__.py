"""``python -m stylegen``: the command line."""

from stylegen.apps.cli import main

main()
