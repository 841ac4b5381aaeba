"""Fine-tune a LLaVA into a grounded model, stage by stage (`python train.py --help`).

The command lives in `grounded_llava/training/command.py` (also `grounded-llava train`).
"""

import sys

from grounded_llava.training.command import main

if __name__ == "__main__":
    sys.exit(main())
