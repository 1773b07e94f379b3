"""The shared backbone: a Ray actor holding one frozen model for many trials (server.py), and a
trial's client of it (client.py)."""
