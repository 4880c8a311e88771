import sys

from baichuan.cli import main

sys.exit(main())
