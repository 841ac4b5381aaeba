"""`python -m grounded_llava.convert`: see `grounded_llava/convert/command.py`."""

import sys

from grounded_llava.convert.command import main

sys.exit(main())
