import sys

from doe_ext.cli import main

sys.exit(main())
