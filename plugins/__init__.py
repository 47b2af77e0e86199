"""The built-in plugins, one folder per kind. Installed as the package ``nestar_plugins`` (pyproject.toml,
``[tool.setuptools.package-dir]``: this folder is that package) and registered through the ``nestar_lab``
entry-point group, the same one third-party packages use."""
