"""Thin command functions behind the ``lmforge`` command line (see :mod:`lmforge.cli`).

Each parses nothing itself (the CLI builds its options from the typed signature), calls one
pipeline function and prints the result; none holds logic of its own. One module per command
(or pair of commands that share their printing), named for it.
"""
