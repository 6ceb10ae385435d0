"""The ``dmfast`` command-line application (installed as the package ``dmfast.cli``)."""
