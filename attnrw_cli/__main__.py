"""``python -m attnrw_cli``: the ``attnrw`` command."""

import sys

from attnrw_cli import main

sys.exit(main())
