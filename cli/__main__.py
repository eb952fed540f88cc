import os
import sys

# `python -m cli` puts the working directory first on sys.path, where a data folder named like one of
# our packages (the README's own `shards/`) would shadow the installed package: keep it out, unless
# it is this checkout itself.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.getcwd() != _checkout:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.getcwd()]

from cli.app import main  # noqa: E402

main()
