"""`python -m sqltune ...` (and `torchrun -m sqltune finetune ...`)."""

import sys

from sqltune.cli import main

if __name__ == "__main__":
    sys.exit(main())
