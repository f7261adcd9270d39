"""The local stack (`recolor stack`): the production roles as processes on 127.0.0.1. `services.py` (up, down,
status, env), `s3_server.py` (`rclone serve s3`), `processes.py` (which processes are the stack's), `cli.py`."""
