"""``python -m explainer``: the method's command line (:mod:`cli.explainer_cmd`, the top layer)."""

import sys

from cli.explainer_cmd import main

if __name__ == "__main__":
    sys.exit(main())
