"""``python -m ppl_genmodels`` runs the same command line as ``ppl-genmodels``."""

import sys

from ppl_genmodels.cli import main

sys.exit(main())
