"""The `softprompt` command (main.py) and its handlers, one module per group of commands."""
