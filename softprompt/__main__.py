"""`python -m softprompt ARGS` is the `softprompt` command (a Ray job's entrypoint runs it so)."""
import sys

from softprompt.search.cli import main

sys.exit(main())
