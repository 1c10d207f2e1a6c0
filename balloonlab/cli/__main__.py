import sys

from balloonlab.cli import main

sys.exit(main())
