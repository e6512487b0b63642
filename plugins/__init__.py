"""Built-in mmat plugins, written exactly as third-party plugins are.

Each module is one plugin: functions marked ``@hookimpl`` that register implementation
classes. The host loads them by name from ``mmat_assets.plugins.DEFAULT_PLUGINS``.
"""
