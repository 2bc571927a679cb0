import sys

from capture.prompt.cli import main

sys.exit(main())
