"""kv-node: a node of the kv distributed key-value store."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kv-node")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
