"""diffusers, imported from several threads at once.

diffusers resolves its classes lazily (``diffusers.utils.import_utils._LazyModule``): the first
thread that asks for a class imports the submodules defining it, and a second thread asking at the
same moment can find one of them half imported and fail with ``ImportError: cannot import name
'UNet2DModel' from 'diffusers'``. The control plane plans jobs in FastAPI's thread pool (a plan
builds the student on the meta device to count its parameters), so concurrent ``POST /jobs`` did.
Every import of a diffusers class in the project runs under ``DIFFUSERS``; once a class is resolved,
diffusers keeps it as a plain attribute and the lock is only held for a lookup.

Take the lock inside functions only, never while a module body runs: a thread that holds it may be
waiting for that module's own import lock.
"""

from __future__ import annotations

import threading

DIFFUSERS = threading.RLock()
