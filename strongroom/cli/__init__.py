"""The ``strongroom`` command-line tool."""
