"""Train a LoRA from a YAML config: ``python train.py --config configs/my_lora_config.yaml``.

Also works under ``accelerate launch train.py --config ...``.
"""

import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
