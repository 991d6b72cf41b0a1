"""``python -m defectlens``: the same command as ``defectlens``."""

import sys

from defectlens.cli import main

sys.exit(main())
