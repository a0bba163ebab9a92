"""aecore's built-in variants. Each module is one plugin, registered in setup.py
through the ``aecore.models`` entry-point group like any third-party package."""
