"""Caption a folder of training images into metadata.csv:
``python tools/auto_label.py --input data/x --output data/x/metadata.csv [--model blip|clip|wd14|PATH]``.

The same as ``python -m lora_trainer caption ...``; run ``--help`` for every option.
"""

import os
import sys

# Run by path from anywhere: make the repository root importable without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_trainer.caption.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
