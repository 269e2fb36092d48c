import sys

from side4video.cli.main import main

sys.exit(main())
