import sys

from batch.classify import main

sys.exit(main())
