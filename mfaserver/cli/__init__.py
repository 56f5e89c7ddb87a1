"""The ``mfaserver`` admin command line (click): one module per noun.

``main.cli`` is the group; ``main.main`` is the console-script entry point.
"""
