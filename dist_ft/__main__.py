"""`python -m dist_ft ...` is `dist-ft ...`."""
import sys

from .cli import main

sys.exit(main())
