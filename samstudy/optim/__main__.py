"""``python -m samstudy.optim FILE...`` (``make docs``): rewrite the generated preset tables."""

import sys

from samstudy.optim.presets import write_docs

for target in sys.argv[1:]:
    print(f"{target}: {'updated' if write_docs(target) else 'up to date'}")
