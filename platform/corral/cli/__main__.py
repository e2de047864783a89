"""`python -m corral.cli`: what `corral serve --fd` children and the tests run."""

import sys

from corral.cli import main

sys.exit(main())
