"""Install hints that match how kdfast itself was installed.

An optional dependency that is missing is reported with one `pip` line the user can paste.
For a wheel from an index that line is `pip install 'kdfast[extra]'`; for an install from a
source checkout (`pip install .` or `-e .`, recorded in the distribution's
`direct_url.json`) the extra cannot be fetched by name, so the line installs the packages
themselves under the checkout's `constraints.txt`, which keeps the pinned CPU torch in place.
Nothing here imports another part of kdfast.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import unquote, urlparse

__all__ = ["install_hint", "source_checkout"]


@lru_cache(maxsize=1)
def source_checkout() -> Optional[Path]:
    """The source directory kdfast was installed from, or None for an install from an index."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        text = distribution("kdfast").read_text("direct_url.json")
    except PackageNotFoundError:
        text = None
    if text:
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        url = record.get("url", "")
        if "dir_info" in record and url.startswith("file://"):
            return Path(unquote(urlparse(url).path))
    # not installed at all: running from a checkout on sys.path (python/kdfast/contract/...)
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir():
        return root
    return None


def install_hint(extra: str, packages: Sequence[str]) -> str:
    """The `pip` command that installs `packages` (kdfast's `extra`) the way kdfast was installed."""
    names = " ".join(packages)
    checkout = source_checkout()
    if checkout is None:
        return f"pip install 'kdfast[{extra}]' (or: pip install {names})"
    constraints = checkout / "constraints.txt"
    pin = f"-c {constraints} " if constraints.is_file() else ""
    return f"pip install {pin}{names}"
