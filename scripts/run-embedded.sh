#!/usr/bin/env bash
# Start the django-q2 cluster (tasks and schedules) and the web server; stop both on Ctrl-C.
set -euo pipefail
BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}

"$BIN/python" manage.py qcluster &
cluster=$!
stop_cluster() {
    # qcluster ignores SIGTERM (django-q2 issue #346): SIGINT, then SIGKILL after a grace time.
    kill -INT "$cluster" 2>/dev/null || return 0
    for _ in $(seq 1 10); do kill -0 "$cluster" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$cluster" 2>/dev/null || true
}
trap stop_cluster EXIT INT TERM

echo "Meterline is starting on http://$HOST:$PORT/ (admin: http://$HOST:$PORT/admin/, API docs: http://$HOST:$PORT/api/v1/docs)"
"$BIN/python" manage.py runserver "$HOST:$PORT"
