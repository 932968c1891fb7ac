"""The application layer: what a user runs, on top of the library packages.

- ``cli``: the ``lily-lab`` command (argument parsing, one-line errors, exit status 2);
- ``commands``: what ``lily-lab demo`` and ``lily-lab report`` do, built from the public API;
- ``runtime``: the command's CPU thread choices (thread count, OpenMP wait policy), in one place;
- ``demo``: the packaged MiniLM and tweets, CSV loading, small training and evaluation helpers,
  the classification head file;
- ``llm``: the packaged SmolLM2-135M-Instruct and the tweets as a chat task for causal LMs;
- ``report``: one self-contained HTML report, where ``analysis`` and ``plots`` meet.

This is the only place that reads files a user names on the command line and that chooses how
many threads torch runs. These modules may import every package of lily_lab; no package imports
them (tests/test_architecture.py, docs/architecture.md). ``lily_lab.report`` is the report
function; ``lily_lab.demo``, ``lily_lab.llm``, ``lily_lab.commands`` and ``lily_lab.cli`` are
these modules under their older names (the same module objects: lily_lab/__init__.py).

Importing this package imports none of its modules.
"""
