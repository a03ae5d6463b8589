import sys

from refresher.cli import main

sys.exit(main())
