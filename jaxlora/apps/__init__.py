"""The applications built on the library: the command line, the demos and their data.

Nothing in the library imports this package. ``python -m jaxlora`` (and the
``jaxlora`` script) run :func:`jaxlora.apps.cli.main`.
"""
