import sys

from droppath.cli import main

sys.exit(main())
