"""The example's YAML-declared definitions (one folder a component instance), merged in by definitions.py."""
