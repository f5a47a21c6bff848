import sys

from compat.upstream.runner import main

sys.exit(main())
