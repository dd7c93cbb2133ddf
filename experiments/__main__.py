import sys

from plutao.experiments.cli import main

sys.exit(main())
