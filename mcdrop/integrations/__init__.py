"""Integrations with the frameworks people train in: Lightning and the Hugging Face ``Trainer``.

Each submodule imports its framework lazily, on first use (``mcdrop._checks.import_optional``), and raises
:class:`~mcdrop.errors.MissingDependencyError` (an ``ImportError``) naming the extra to install
(``pip install "mcdrop[lightning]"``, ``"mcdrop[transformers]"``) when it is missing, so that
``import mcdrop`` stays light.
"""
