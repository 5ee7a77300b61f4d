import sys

from duplex.apps.cli import main

sys.exit(main())
