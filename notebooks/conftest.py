"""Notebooks run in their quick form under the test suite (small training runs)."""

import os

os.environ.setdefault("JAXDIFF_QUICK", "1")
