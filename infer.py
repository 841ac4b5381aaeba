"""Answer questions about images with boxes and masks; write overlays and JSON (`python infer.py --help`).

The command lives in `grounded_llava/inference/command.py` (also `grounded-llava infer`).
"""

import sys

from grounded_llava.inference.command import main

if __name__ == "__main__":
    sys.exit(main())
