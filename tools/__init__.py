"""Tools of the repository (not part of the installed package), run from its root as modules:
``.venv/bin/python -m tools.NAME``, so that they import each other and the benchmarks as packages."""
