"""pySigma discovers this module as the ``vmkernel`` backend (``sigma convert -t vmkernel``).

The backend itself lives in :mod:`vmkernel.rules.sigma`; this namespace module only exposes it
where pySigma's plugin discovery looks.
"""

from vmkernel.rules.sigma import VmkernelBackend

backends = {"vmkernel": VmkernelBackend}

__all__ = ["VmkernelBackend"]
