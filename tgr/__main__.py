"""``python -m tgr``: the same as the ``tgr`` command."""
import sys

from tgr.cli import main

sys.exit(main())
