"""`recolor stack up|down|status|env`: argument parsing and printing around `infra.stack.services`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from infra.stack.services import DEFAULT_DIR, StackError, StackState, stack_status, start_stack, stop_stack


def add_stack_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="run S3, MLflow and a Ray head on 127.0.0.1 (no Docker)",
        description="A local stand-in for the cluster: `rclone serve s3` with generated keys (buckets lake, mlflow, "
        "runs), an MLflow server (SQLite, artifacts in S3) and a Ray head with its dashboard and a token-protected "
        "job API, all on 127.0.0.1. Data, logs and state (mode 600) live in the stack folder.",
        epilog="examples:\n"
        '  recolor stack up && eval "$(recolor stack env)"\n'
        "  recolor submit ingest folder s3://lake/sources/photos --dataset photos\n"
        "  recolor stack down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="stack_command", required=True, metavar="{up,down,status,env}")
    up = commands.add_parser("up", help="start the stack; prints the export lines to use it")
    down = commands.add_parser("down", help="stop every process the stack started, and nothing else")
    status = commands.add_parser("status", help="which services run and answer")
    env = commands.add_parser("env", help="print the export lines (they include the S3 keys)")
    for sub in (up, down, status, env):
        sub.add_argument("--dir", default=DEFAULT_DIR, help=f"stack folder (default: {DEFAULT_DIR})")
    up.add_argument("--dashboard-port", type=int, help="Ray dashboard and job API (default: 8265 when free)")
    up.add_argument("--mlflow-port", type=int, help="MLflow server (default: 5000 when free)")
    up.add_argument("--num-cpus", type=int, default=2, help="CPUs the Ray head offers to jobs (default: 2)")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the services (default: 180)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    up.set_defaults(handler=run_stack_up)
    down.set_defaults(handler=run_stack_down)
    status.set_defaults(handler=run_stack_status)
    env.set_defaults(handler=run_stack_env)


def export_lines(state: StackState) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in state.exports().items())


def run_stack_up(args) -> int:
    started = time.perf_counter()
    try:
        state = start_stack(args.dir, args.dashboard_port, args.mlflow_port, args.num_cpus, args.timeout)
    except StackError as e:
        print(f"recolor: error: {e}", file=sys.stderr)
        return 1
    # The summary goes to stderr and the exports to stdout, so `eval "$(recolor stack up)"` works too.
    print(f"stack {state.stack_id} up in {state.dir} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    for name, info in stack_status(state).items():
        print(f"  {name:<7} {info['url']:<24} pid {info['pid']:<8} log {info['log']}", file=sys.stderr)
    print(f"  Ray GCS 127.0.0.1:{state.gcs_port} (token in {state.token_path})", file=sys.stderr)
    print(f'use it from a shell: eval "$(recolor stack env --dir {shlex.quote(args.dir)})"', file=sys.stderr)
    sys.stdout.write(export_lines(state))
    return 0


def run_stack_down(args) -> int:
    try:
        stopped = stop_stack(args.dir)
    except StackError as e:
        print(f"recolor: {e}", file=sys.stderr)
        return 1
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def run_stack_status(args) -> int:
    try:
        state = StackState.load(args.dir)
    except StackError as e:
        print(f"recolor: {e}", file=sys.stderr)
        return 1
    services = stack_status(state)
    healthy = all(info["running"] and info["answering"] for info in services.values())
    if args.json:
        print(json.dumps({"stack_id": state.stack_id, "dir": state.dir, "services": services}, indent=2))
    else:
        print(f"stack {state.stack_id} in {state.dir} (started {state.created})")
        for name, info in services.items():
            word = "up" if info["running"] and info["answering"] else "running" if info["running"] else "down"
            print(f"  {name:<7} {word:<8} {info['url']:<24} pid {info['pid']:<8} log {info['log']}")
    return 0 if healthy else 1


def run_stack_env(args) -> int:
    try:
        state = StackState.load(args.dir)
    except StackError as e:
        print(f"recolor: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(export_lines(state))
    return 0
