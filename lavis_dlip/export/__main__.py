"""``python -m lavis_dlip.export``: see lavis_dlip.export."""

import sys

from lavis_dlip.export import main

sys.exit(main())
