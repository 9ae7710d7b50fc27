"""The shipped run configs (``hfc-engine run <name>``), installed as the package ``engine.presets``."""
