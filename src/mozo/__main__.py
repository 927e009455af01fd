import sys

from mozo.cli import main

sys.exit(main())
