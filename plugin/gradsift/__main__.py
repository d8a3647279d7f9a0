"""`python -m gradsift` (also what `accelerate launch -m gradsift` runs)."""

import sys

from gradsift.cli import main

sys.exit(main())
