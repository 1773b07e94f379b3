"""`python -m softprompt ARGS` is the `softprompt` command (a Ray job's entrypoint runs it so)."""
import sys

from softprompt.cli.main import main

sys.exit(main())
