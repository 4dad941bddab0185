"""`python -m inference.protos [DIR]`: generate TorchServe's gRPC stubs ahead of time."""

import sys
from pathlib import Path

from persia_inc.inference.protos import generate

if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
