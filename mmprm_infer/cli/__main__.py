"""``python -m mmprm_infer.cli``: the ``mmprm`` command."""

import sys

from mmprm_infer.cli import main

sys.exit(main())
