import sys

from nonn.cli import main

sys.exit(main())
