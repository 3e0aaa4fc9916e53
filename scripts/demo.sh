#!/usr/bin/env bash
# Quick start: build inferd, start the daemon on the committed tiny model, send it a
# prompt, stop the daemon. Offline; installs cmake and libclang-dev when missing.
# Usage: bash scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"Tell me a story"}
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
cargo build --release -q -p inferd --bin inferd
dir=$(mktemp -d /tmp/inferd-demo.XXXXXX)
bin=target/release/inferd
"$bin" serve --backend llamacpp --model-path tests/fixtures/tiny-scripted.gguf --n-threads 1 \
  --runtime-dir "$dir/run" --log-dir "$dir/logs" 2>"$dir/daemon.err" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$dir/run/infer.sock" ] && break; sleep 0.1; done
"$bin" status --once --runtime-dir "$dir/run"
echo "> $prompt"
"$bin" generate --runtime-dir "$dir/run" --temperature 0 "$prompt"
