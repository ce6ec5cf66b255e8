import sys

from droppath.apps.cli import main

sys.exit(main())
