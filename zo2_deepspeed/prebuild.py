"""``python -m zo2_deepspeed.prebuild``: compile DeepSpeed's ops that zo2_deepspeed uses, before any run needs them."""
import sys

from .jit_ops import main

if __name__ == "__main__":
    sys.exit(main())
