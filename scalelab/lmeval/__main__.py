"""`python -m scalelab.lmeval ...`: lm-eval's own command line, with the `scalelab` model
type registered (importing the package registers it). Plain `lm_eval` does the same where
scalelab_lmeval.pth is installed (wheels; install.sh for editable installs)."""

import sys

from lm_eval.__main__ import cli_evaluate

import scalelab.lmeval  # noqa: F401

sys.argv[0] = "lm_eval"
cli_evaluate()
