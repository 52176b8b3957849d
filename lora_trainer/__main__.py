import sys

from lora_trainer.cli import main

sys.exit(main())
