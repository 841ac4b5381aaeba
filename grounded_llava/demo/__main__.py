"""`python -m grounded_llava.demo`: see `grounded_llava/demo/command.py`."""

import sys

from grounded_llava.demo.command import main

sys.exit(main())
