#!/usr/bin/env bash
# Send one smoke request through llm_proxy and show what came back:
# the HTTP status, the rate-limit headers and the assistant's reply.
#
#   PROXY_URL  where the proxy listens   (default http://127.0.0.1:8899)
#   PROXY_KEY  the client key to send    (default: first of PROXY_API_KEYS, else "local-test")
#   MODEL      the model to ask for      (default: BASE_MODEL, else "local-model")
# PORT, PROXY_API_KEYS and BASE_MODEL are read as run_local_proxy.sh reads them: the
# environment first, then the saved settings file ($LLM_PROXY_SETTINGS, default
# ./local_proxy.env beside this script), so the two scripts agree without repeating them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
settings="${LLM_PROXY_SETTINGS:-$here/local_proxy.env}"
if [[ -f "$settings" ]]; then
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%$'\r'}"
    if [[ "$line" =~ ^[[:space:]]*(PORT|PROXY_API_KEYS|BASE_MODEL)=(.*)$ ]]; then
      name="${BASH_REMATCH[1]}"
      value="${BASH_REMATCH[2]}"
      value="${value#[\"\']}" && value="${value%[\"\']}"
      if [[ -z "${!name:-}" ]]; then  # the environment wins over the saved file
        export "$name=$value"
      fi
    fi
  done < "$settings"
fi

url="${PROXY_URL:-http://127.0.0.1:${PORT:-8899}}"
first_key="${PROXY_API_KEYS:-}"
first_key="${first_key%%,*}"
key="${PROXY_KEY:-${first_key:-local-test}}"
model="${MODEL:-${BASE_MODEL:-local-model}}"

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

status="$(curl -sS -o "$workdir/body" -D "$workdir/headers" -w '%{http_code}' \
  "$url/v1/chat/completions" \
  -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Reply with exactly: proxy ok\"}]}")"

echo "status: $status"
grep -i -E '^(x-ratelimit-|retry-after)' "$workdir/headers" | tr -d '\r' || true
python3 - "$workdir/body" <<'PY'
import json, sys
raw = open(sys.argv[1], "rb").read()
try:
    body = json.loads(raw)
except ValueError:
    print("reply (not JSON):", raw[:500].decode("utf-8", "replace"))
    sys.exit(0)
if "error" in body:
    print("error:", body["error"].get("message"))
else:
    print("reply:", body["choices"][0]["message"]["content"])
PY
