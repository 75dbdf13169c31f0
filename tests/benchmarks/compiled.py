"""The module as an installed user runs it, for the benchmarks.

pip compiles a package's bytecode at install time; a checkout under
PYTHONDONTWRITEBYTECODE (or in a read-only directory) would compile the
4000-line module afresh on every run, adding ~20 ms and ~8 MiB that no real
install pays. `compiled_copy` gives a directory to put on PYTHONPATH that
holds a copy of the module with its bytecode next to it.
"""

import os
import py_compile
import shutil

from checkout import REPO


def compiled_copy(scratch):
    """A directory under `scratch` with sinfonia_tier3.py and its bytecode."""
    directory = os.path.join(scratch, "compiled")
    os.makedirs(directory, exist_ok=True)
    module = shutil.copy(REPO / "sinfonia_tier3.py", directory)
    py_compile.compile(module, doraise=True)
    return directory
