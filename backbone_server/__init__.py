"""The shared backbone: a Ray actor holding one frozen model for many trials (server.py), and its client (client.py)."""
