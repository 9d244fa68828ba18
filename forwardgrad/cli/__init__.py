"""The ``forwardgrad`` command line: ``train``, ``compare``, ``reproduce``, ``plot`` and ``bench``.

Subcommands are registered in ``commands.COMMANDS`` (name -> help, flags, function). Every
subcommand returns an exit code: 0 done, 1 a run diverged (``train``), 2 bad arguments or data,
or any other error of forwardgrad's own (``ForwardGradError``: one line on stderr, never a
traceback), 3 a distributed job failed (a rank died, hung or diverged from the others), 130/143
stopped by SIGINT/SIGTERM (in training after writing a checkpoint; anywhere else at once, with how
to continue). Any other exception is a bug and keeps its traceback.

Under ``torchrun`` (RANK, WORLD_SIZE, ... in the environment) ``train`` runs as one rank of a
data-parallel job (``forwardgrad.distributed``); only rank 0 prints, writes and reports.

Modules: ``flags`` (the flags and the config they give), ``progress`` (the progress display),
``runs`` (running planned runs), ``train``, ``compare`` (compare and reproduce), ``commands``
(the registry, plot, bench, the parser) and ``entry`` (``main``).
"""

from forwardgrad.cli.entry import main

__all__ = ["main"]
