"""`python -m rnnlm_ext ...` is the `rnnlm` command."""
import sys

from rnnlm_ext.cli import main

sys.exit(main())
