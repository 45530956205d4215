#!/usr/bin/env bash
# Start llm_proxy in front of a model server on this machine.
#
# Settings come from, in order of priority:
#   1. the environment (e.g. `PORT=9000 ./run_local_proxy.sh`),
#   2. a saved settings file, KEY=VALUE per line: $LLM_PROXY_SETTINGS,
#      default ./local_proxy.env beside this script (see examples/local_proxy.env),
#   3. the defaults below: upstream http://127.0.0.1:8080/v1, listen on 127.0.0.1:8899.
# Any arguments are passed to llm_proxy.py (try --help).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
settings="${LLM_PROXY_SETTINGS:-$here/local_proxy.env}"

if [[ -f "$settings" ]]; then
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    if [[ ! "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
      echo "run_local_proxy.sh: ignoring malformed line in $settings: $line" >&2
      continue
    fi
    name="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
    value="${value#[\"\']}" && value="${value%[\"\']}"
    if [[ -z "${!name:-}" ]]; then  # the environment wins over the saved file
      export "$name=$value"
    fi
  done < "$settings"
fi

if [[ -z "${BASE_API_URL:-}${UPSTREAM_BASE_URL:-}${base_api_url:-}" ]]; then
  export BASE_API_URL="http://127.0.0.1:8080/v1"
fi
export HOST="${HOST:-127.0.0.1}"
export PORT="${PORT:-8899}"

exec python3 "$here/llm_proxy.py" "$@"
