"""fedrad: federated, differentially private training of medical-image classifiers.

The import namespace maps onto the repository's top-level folders:
``fedrad.common`` -> ``common/``, ``fedrad.server`` -> ``server/``,
``fedrad.client`` -> ``client/``.
"""

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"


def bundled_path(*parts: str) -> Path:
    """Return the path of a file shipped inside the ``fedrad`` package."""
    return Path(str(resources.files("fedrad").joinpath(*parts)))
