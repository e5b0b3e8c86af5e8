"""`python -m rnnlm_ext ...` is the `rnnlm` command."""

import sys

from rnnlm_ext.lm.cli import main

sys.exit(main())
