"""`python -m zaya_train ...` (what torchrun launches) is the `zaya-train` command."""

from zaya_train.cli import main

main()
