"""`python -m lmkit ...`, the entry point torchrun starts on each rank: `torchrun -m lmkit pretrain ...`."""

from cli.main import main

main()
