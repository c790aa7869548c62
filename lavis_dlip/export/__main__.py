import sys

from lavis_dlip.export import main

sys.exit(main())
