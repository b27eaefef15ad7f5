"""`python -m dist_ft.plan RECIPE.yaml ...`: the same as `dist-ft plan`."""

import sys

from .command import main

sys.exit(main())
