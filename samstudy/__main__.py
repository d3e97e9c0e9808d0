import sys

from samstudy.cli import main

sys.exit(main())
