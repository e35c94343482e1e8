"""fastserve's version, in a module of its own: the package's ``__init__`` leads (lazily) to the
app, so a module the app imports takes the version from here, and the import graph stays a DAG."""

__version__ = "0.1.0"
