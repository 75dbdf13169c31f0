"""This checkout of the repository, for the tests, the test cloudlet and the
benchmarks.

`REPO` is its root directory. Importing this module puts it first on
sys.path, so that `import sinfonia_tier3` is this checkout's module, never an
installed copy.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))
