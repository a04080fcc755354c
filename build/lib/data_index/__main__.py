"""``python -m data_index``: the catalog's command line (:mod:`cli.data_index_cmd`, the top layer)."""

import sys

from cli.data_index_cmd import main

if __name__ == "__main__":
    sys.exit(main())
