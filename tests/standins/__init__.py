"""Local stand-ins for outside services (tests only): real HTTP on 127.0.0.1."""
