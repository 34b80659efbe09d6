"""Entry points: the ``hublaunch`` command and the local stack runner (imports api and worker)."""
