"""python -m tritonbn: the self-check (tritonbn/selfcheck.py); exits 1 if a case fails."""
import sys

from .selfcheck import main

sys.exit(main())
