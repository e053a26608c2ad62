"""How a run is carried out, apart from what it computes: files, locks, processes, signals.

Modules (none imports from the rest of zosol except :mod:`zosol.zo`'s process-group helpers):

* :mod:`~zosol.runtime.files`    atomic writes (no symlink following), ``FileLock``, directories checked
  before use, one-line OS errors: the checks that keep writes safe live here, in one place.
* :mod:`~zosol.runtime.memory`   the machine's memory, human-readable sizes.
* :mod:`~zosol.runtime.rundir`   ``RunDirectory``: a training run's files (config, checkpoint, history,
  dataset, failure record), prepared and locked once, written by ``train()`` whoever called it;
  ``directory_lock`` for other output directories (``compare --out``).
* :mod:`~zosol.runtime.options`  ``RunOptions``: the run controls (workers, resume, progress,
  checkpoint timing), checked once.
* :mod:`~zosol.runtime.stop`     SIGTERM stops a run after its step, checkpointed; workers die with their parent.
* :mod:`~zosol.runtime.workers`  local worker processes (``--workers N``): how many, how they leave.
* :mod:`~zosol.runtime.launch`   ``torchrun`` process groups: rank 0 leads, lost ranks named in one line.

Importing this package imports nothing heavy (torch only comes with ``launch``).
"""
