"""Run the IM server in the foreground (what supervisord runs): python run.py"""

import sys

from server.lifecycle import main

if __name__ == "__main__":
    sys.exit(main())
