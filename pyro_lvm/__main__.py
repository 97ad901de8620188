"""``python -m pyro_lvm``: the ``pyro-lvm`` command (see :mod:`pyro_lvm.cli`)."""

import sys

from pyro_lvm.cli import main

if __name__ == "__main__":
    sys.exit(main())
