#!/usr/bin/env bash
# Starts, or restarts, Corral's API on the head node of the `ray up` cluster
# (cluster/ray-up.yaml runs it after `ray start --head`; run it again the same way with
# `ray exec cluster/ray-up.yaml '. ~/.corral-node.env && bash ~/corral-src/cluster/ray-up-api.sh'`).
#
# The API's secrets (CORRAL_API_KEYS, CORRAL_OPERATOR_KEYS, CORRAL_DATABASE_URL,
# CORRAL_JOB_TOKEN_SECRET, CORRAL_MILVUS_TOKEN, ...) are one SSM SecureString parameter,
# in the format of an env file, that only the head's instance role may read. They are
# written to a file only its user can read and never reach the workers.
set -euo pipefail

PARAMETER=${CORRAL_ENV_PARAMETER:-/corral/env}
REGION=${CORRAL_AWS_REGION:-us-west-2}
STATE=$HOME/.config/corral
ENV_FILE=$STATE/corral.env
PID_FILE=$STATE/serve.pid
LOG=$HOME/corral-serve.log
PORT=8321

umask 077
mkdir -p "$STATE"
"$HOME/corral-venv/bin/python" - "$PARAMETER" "$REGION" >"$ENV_FILE.new" <<'PY'
import sys

import boto3

name, region = sys.argv[1:]
answer = boto3.client("ssm", region_name=region).get_parameter(Name=name, WithDecryption=True)
sys.stdout.write(answer["Parameter"]["Value"] + "\n")
PY
mv "$ENV_FILE.new" "$ENV_FILE"

# The previous API process of this script, if any, goes first (by its recorded pid).
if [ -f "$PID_FILE" ]; then
    old=$(cat "$PID_FILE")
    if kill -0 "$old" 2>/dev/null; then
        kill "$old"
        for _ in $(seq 60); do kill -0 "$old" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$PID_FILE"
fi

set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
# The local Ray head and its Jobs API (loopback), whatever the env file says.
export RAY_ADDRESS=127.0.0.1:6379
export CORRAL_RAY_JOBS_URL=http://127.0.0.1:8265
export CORRAL_MODELS_FILE=${CORRAL_MODELS_FILE:-$HOME/corral-src/cluster/models.yaml}
# Where jobs on the workers report to (docs/job_credentials.md): this node's private
# address, which the cluster's security group admits from the workers.
CORRAL_INTERNAL_URL=${CORRAL_INTERNAL_URL:-http://$(hostname -I | awk '{print $1}'):$PORT}
export CORRAL_INTERNAL_URL

setsid nohup corral serve --host 0.0.0.0 --port "$PORT" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PID_FILE"

# `corral serve` migrates the schema and starts the models before it answers.
for _ in $(seq 1800); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
        echo "Corral API up on port $PORT (log: $LOG)"
        exit 0
    fi
    kill -0 "$(cat "$PID_FILE")" 2>/dev/null || { echo "corral serve exited; see $LOG" >&2; exit 1; }
    sleep 1
done
echo "Corral API not answering on port $PORT after 30 minutes; see $LOG" >&2
exit 1
