"""`python -m flatlora_diffusion.convert`: kept as an alias of `python -m flatlora_diffusion.lora.convert`."""

import sys

from flatlora_diffusion.lora.convert import main

if __name__ == "__main__":
    sys.exit(main())
