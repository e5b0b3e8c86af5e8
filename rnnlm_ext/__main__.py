"""`python -m rnnlm_ext ...` is the `rnnlm` command."""
from rnnlm_ext.cli import main

main()
