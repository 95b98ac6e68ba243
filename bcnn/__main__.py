import sys

from bcnn.cli import main

sys.exit(main())
