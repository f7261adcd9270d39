"""Remote execution: `submit.py` (`recolor submit`, `recolor jobs`), `sealed_env.py` (credentials sealed with the
cluster token)."""
