"""`python -m hippo ...` is the `hippo` command."""
import sys

from hippo.cli import main

sys.exit(main())
